"""gRPC settings shared by every service and client."""

from __future__ import annotations

import grpc.experimental

MAX_MESSAGE = 64 << 20  # a prompt chunk of an 8B model's hidden states is 2 MB; logits up to 0.5 MB

CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.enable_http_proxy", 0),  # loopback and cluster addresses never go through a proxy
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # a restarted stage is found again within about a second, not after minutes of backoff
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
# Server-streaming calls (Generate at a client, Results at the coordinator) are read by the thread that iterates them,
# waiting on the call itself; by default the channel's polling thread takes each message and wakes that thread.
# Hop trace, 3 same-run pairs: a token's answer from stage 4 to the coordinator 420-525 -> 270-450 us.
READ_STREAMS_IN_CALLER = [(grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
SERVER_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
    # Clients keep idle streams alive with a ping every 10 s; the server default (one ping per 5 min,
    # two strikes) would answer GOAWAY "too_many_pings" and cut live Results and data streams.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.keepalive_permit_without_calls", 1),
]


def listen_host(listen: str) -> str:
    """The host part of a --listen address ("0.0.0.0:50061" -> "0.0.0.0"), where /metrics is served too."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host or "127.0.0.1"
