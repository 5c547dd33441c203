import json
from pathlib import Path

import gguf
import pytest
from helpers import LLAMA3_TEMPLATE, MULTIBYTE, SPECIALS, tiny_llama3_tokenizer
from tokenizers import Tokenizer

from splitllm.export.tokenizer import compact_merges, tokenizer_from_gguf, tokenizer_from_hf_dir
from splitllm.services.coordinator.text import ChatTemplate, IncrementalDecoder, StopMatcher, TextCodec


@pytest.fixture(scope="module")
def smollm(smollm2_path, reference):
    return tokenizer_from_gguf(gguf.GGUFReader(smollm2_path)), reference


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama3")
    tiny_llama3_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>", "special": True},
         "chat_template": LLAMA3_TEMPLATE}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [1, 4]}))
    return path


@pytest.fixture(scope="module")
def codec(llama3_dir) -> TextCodec:
    return TextCodec.from_file(llama3_dir / "tokenizer.json", bos_token_id=0)


# --- the embedded default against llama.cpp -------------------------------------------------------------

def test_gguf_bundle_fields(smollm):
    bundle, ref = smollm
    assert (bundle.bos_token_id, bundle.eos_token_id, bundle.add_bos) == (1, 2, False)
    assert (bundle.bos_token, bundle.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert bundle.stop_token_ids[0] == 2 and 0 in bundle.stop_token_ids  # <|im_end|>, <|endoftext|>
    assert bundle.chat_template == ref["chat_template"]


def test_gguf_template_and_prompt_ids_match_llamacpp(smollm):
    bundle, ref = smollm
    template = ChatTemplate(bundle.chat_template, bundle.bos_token, bundle.eos_token)
    codec = TextCodec.from_json(bundle.tokenizer_json, bundle.bos_token_id)
    for case in ref["prompts"]:
        rendered = template.render([{"role": "user", "content": case["prompt"]}])
        assert rendered == case["rendered_prompt"]
        assert codec.encode(rendered) == case["prompt_token_ids"]


def test_gguf_greedy_ids_decode_to_greedy_text(smollm):
    bundle, ref = smollm
    codec = TextCodec.from_json(bundle.tokenizer_json)
    for case in ref["prompts"]:
        ids = [i for i in case["greedy_token_ids"] if i not in bundle.stop_token_ids]
        assert codec.decode(ids) == case["greedy_text"]
        decoder = IncrementalDecoder(codec)
        streamed = "".join(decoder.push(i) for i in case["greedy_token_ids"]) + decoder.flush()
        assert streamed == case["greedy_text"]


def test_gguf_multibyte_roundtrip(smollm):
    codec = TextCodec.from_json(smollm[0].tokenizer_json)
    _assert_streams_cleanly(codec, MULTIBYTE)


# --- GGUF tokenizers other than the default ---------------------------------------------------------------

def _write_gguf(path: Path, model: str, pre: str, tokens: list[str], types: list[int], merges: list[str]):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(path)


def test_gguf_llama_bpe_encodes_like_the_hf_tokenizer(tmp_path, llama3_dir):
    hf = Tokenizer.from_file(str(llama3_dir / "tokenizer.json"))
    tokens = [hf.id_to_token(i) for i in range(hf.get_vocab_size())]
    merges = [" ".join(m) for m in json.loads(hf.to_str())["model"]["merges"]]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    bundle = tokenizer_from_gguf(_write_gguf(tmp_path / "t.gguf", "gpt2", "llama-bpe", tokens, types, merges))
    assert (bundle.bos_token, bundle.eos_token, bundle.add_bos) == ("<|begin_of_text|>", "<|eot_id|>", True)
    assert bundle.stop_token_ids == [4, 1]
    text = f"<|start_header_id|>user<|end_header_id|>\n\nWhere is   California?? 12345\n{MULTIBYTE}<|eot_id|>"
    assert TextCodec.from_json(bundle.tokenizer_json).encode(text) == hf.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize(("model", "pre"), [("llama", "default"), ("gpt2", "qwen2")])
def test_gguf_unsupported_tokenizer(tmp_path, model, pre):
    tokens = ["<unk>", "<s>", "</s>", "a", "b"]
    reader = _write_gguf(tmp_path / "t.gguf", model, pre, tokens, [2, 3, 3, 1, 1], [])
    with pytest.raises(ValueError, match="supported: model 'gpt2'.*smollm"):
        tokenizer_from_gguf(reader)


# --- Hugging Face directory (Llama 3 layout) --------------------------------------------------------------

def test_hf_dir_llama3(llama3_dir, codec):
    bundle = tokenizer_from_hf_dir(llama3_dir)
    assert bundle.tokenizer_json == (llama3_dir / "tokenizer.json").read_text()
    assert (bundle.bos_token_id, bundle.eos_token_id, bundle.stop_token_ids) == (0, 4, [4, 1])
    assert (bundle.bos_token, bundle.eos_token, bundle.add_bos) == ("<|begin_of_text|>", "<|eot_id|>", True)

    template = ChatTemplate(bundle.chat_template, bundle.bos_token, bundle.eos_token)
    messages = [{"role": "system", "content": "Be brief. "},
                {"role": "user", "content": "Where is California?"}]
    rendered = template.render(messages)
    assert rendered == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                        "<|start_header_id|>user<|end_header_id|>\n\nWhere is California?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = codec.encode(rendered)
    assert ids[:2] == [0, 2] and ids.count(4) == 2  # BOS, <|start_header_id|>, two <|eot_id|>
    assert codec.encode(rendered, add_bos=True) == ids  # already starts with BOS: no second one
    assert codec.encode("Hello", add_bos=True)[0] == 0 and codec.encode("Hello")[0] != 0
    assert codec.decode(ids) == rendered
    assert codec.token_strings(codec.encode(" the")) == ["Ġthe"]


def test_compact_merges_keeps_the_tokenizer(llama3_dir):
    """Pair-form merges become "a b" strings (lower peak memory at load) and encode the same; merges with
    a space in a token stay pairs."""
    pairs = (llama3_dir / "tokenizer.json").read_text()
    data = json.loads(pairs)
    data["model"]["merges"] = [m.split(" ") if isinstance(m, str) else m for m in data["model"]["merges"]]
    pairs = json.dumps(data)
    compact = compact_merges(pairs)
    assert all(isinstance(m, str) for m in json.loads(compact)["model"]["merges"])
    text = "Hello wörld 12345, <|eot_id|> again"
    assert Tokenizer.from_str(compact).encode(text).ids == Tokenizer.from_str(pairs).encode(text).ids
    data["model"]["merges"].append(["a b", "c"])
    assert compact_merges(json.dumps(data)) == json.dumps(data)


def test_hf_dir_add_bos_token_flag(tmp_path, llama3_dir):
    for name in ("tokenizer.json", "generation_config.json"):
        (tmp_path / name).write_text((llama3_dir / name).read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    bundle = tokenizer_from_hf_dir(tmp_path)  # bos/eos from generation_config.json
    assert (bundle.bos_token, bundle.eos_token_id, bundle.add_bos, bundle.chat_template) == (
        "<|begin_of_text|>", 1, False, None)


# --- chat template ----------------------------------------------------------------------------------------

def test_chat_template_helpers():
    template = ChatTemplate(
        "{% if not date_string is defined %}{% set date_string = strftime_now('%Y') %}{% endif %}"
        "{{ date_string }}|{{ messages | tojson }}|{{ tools | tojson(indent=None) }}"
    )
    out = template.render([{"role": "user", "content": "café"}], tools=[{"name": "f"}])
    assert out.split("|", 1)[1] == '[{"role": "user", "content": "café"}]|[{"name": "f"}]'
    assert out.split("|", 1)[0].isdigit()
    assert template.render([], date_string="26 Jul 2024", tools=[]) == "26 Jul 2024|[]|[]"


def test_chat_template_errors():
    strict = ChatTemplate("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                          "{% endif %}ok")
    assert strict.render([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="first must be user"):
        strict.render([{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match="does not compile"):
        ChatTemplate("{% for m in messages %}")
    with pytest.raises(ValueError, match="failed to render"):  # the sandbox refuses to mutate
        ChatTemplate("{{ messages.append(1) }}").render([])


# --- streaming detokenizer --------------------------------------------------------------------------------

def _assert_streams_cleanly(codec: TextCodec, text: str) -> None:
    ids = codec.encode(text)
    assert codec.decode(ids) == text
    decoder = IncrementalDecoder(codec)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert any(p == "" for p in pieces)  # some tokens ended mid-character and waited


def test_incremental_decoder_multibyte(codec):
    _assert_streams_cleanly(codec, MULTIBYTE)
    assert len(codec.encode("😀")) > 1  # a character split over byte-level tokens


def test_incremental_decoder_window_stays_small(codec):
    sizes = []

    class Recording(TextCodec):
        def decode(self, ids, skip_special=False):
            sizes.append(len(ids))
            return super().decode(ids, skip_special)

    recording = Recording.from_json(codec.tokenizer.to_str())
    ids = codec.encode(MULTIBYTE * 20)
    decoder = IncrementalDecoder(recording)
    assert "".join(decoder.push(i) for i in ids) + decoder.flush() == MULTIBYTE * 20
    assert max(sizes) <= 8


def test_incremental_decoder_skips_special_tokens(codec):
    decoder = IncrementalDecoder(codec)
    ids = codec.encode("Hi<|eot_id|> there")
    pieces = [decoder.push(i) for i in ids]
    assert pieces[ids.index(4)] == "" and "".join(pieces) + decoder.flush() == "Hi there"


# --- stop strings -----------------------------------------------------------------------------------------

def test_stop_split_across_deltas():
    m = StopMatcher(["</answer>", "###"])
    assert [m.push(d).text for d in ["Hello <", "/ans", "wer> tail"]] == ["Hello ", "", ""]
    assert m.stopped == "</answer>" and m.push("more").stop == "</answer>"


def test_stop_partial_prefix_released():
    m = StopMatcher(["</answer>"])
    out = [m.push(d) for d in ["a </an", "t> b <"]]
    assert [o.text for o in out] == ["a ", "</ant> b "] and all(o.stop is None for o in out)
    assert m.flush() == "<"


def test_stop_at_start_and_earliest_wins():
    first = StopMatcher(["STOP"]).push("STOP and more")
    assert (first.text, first.stop) == ("", "STOP")
    both = StopMatcher(["cd", "bcx", "b"]).push("abcd")
    assert (both.text, both.stop) == ("a", "b")
    assert StopMatcher(["", "x"]).push("abc").text == "abc"
