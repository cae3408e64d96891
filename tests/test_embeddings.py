"""Textual-inversion files: the three formats, safe loading, clear errors, token registration."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from library.embeddings import (
    MODELSPEC_ARCHITECTURE, add_embeddings, embeddings_in_text, expand_embedding_names, load_embedding,
    load_embeddings, save_embedding_pt, save_embedding_safetensors, vector_token_names,
)
from library.errors import ModelLoadError


def _vectors(n: int = 3, width: int = 768, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def test_safetensors_round_trip_with_modelspec(tmp_path):
    vectors = _vectors()
    path = tmp_path / "EasyNeg.safetensors"
    save_embedding_safetensors(path, vectors)
    emb = load_embedding(path, expected_width=768)
    assert emb.name == "EasyNeg" and emb.num_vectors == 3 and torch.equal(emb.vectors, vectors)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == ["emb_params"]
    assert meta["modelspec.architecture"] == MODELSPEC_ARCHITECTURE == "stable-diffusion-v1/textual-inversion"
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "EasyNeg"
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left nothing behind


def test_a1111_pt_round_trip_and_layout(tmp_path):
    vectors = _vectors(2)
    path = tmp_path / "badhand.pt"
    save_embedding_pt(path, vectors, step=120, sd_checkpoint="abc", sd_checkpoint_name="v1-5")
    raw = torch.load(path, weights_only=True)
    assert raw["string_to_token"] == {"*": 265} and raw["name"] == "badhand" and raw["step"] == 120
    assert torch.equal(raw["string_to_param"]["*"], vectors)
    emb = load_embedding(path)
    assert emb.name == "badhand" and emb.step == 120 and torch.equal(emb.vectors, vectors)


def test_diffusers_bin_single_vector_and_learned_embeds_token(tmp_path):
    one = _vectors(1)[0]
    torch.save({"<cat-toy>": one}, tmp_path / "cat.bin")
    emb = load_embedding(tmp_path / "cat.bin")
    assert emb.name == "cat" and emb.vectors.shape == (1, 768)
    torch.save({"<cat-toy>": _vectors(2)}, tmp_path / "learned_embeds.bin")
    assert load_embedding(tmp_path / "learned_embeds.bin").name == "cat-toy"


def test_code_pickle_is_refused(tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": Evil()}}, f)
    with pytest.raises(ModelLoadError, match="refused to load.*never executes code"):
        load_embedding(path)
    assert "must never run" not in capsys.readouterr().out


def test_wrong_width_names_file_found_and_expected(tmp_path):
    path = tmp_path / "xl.safetensors"
    save_file({"emb_params": torch.zeros(2, 1024)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        load_embedding(path, expected_width=768)
    message = str(err.value)
    assert "xl.safetensors" in message and "1024" in message and "768" in message and "SD2" in message


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no such embedding"):
        load_embedding(tmp_path / "missing.safetensors")
    save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(tmp_path / "sdxl.safetensors"))
    with pytest.raises(ModelLoadError, match="SDXL"):
        load_embedding(tmp_path / "sdxl.safetensors")
    save_file({"a": torch.zeros(1), "b": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ModelLoadError, match="emb_params"):
        load_embedding(tmp_path / "lora.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(ModelLoadError, match="truncated"):
        load_embedding(tmp_path / "cut.safetensors")


def test_folder_loading_and_duplicate_tokens(tmp_path):
    (tmp_path / "sub").mkdir()
    save_embedding_safetensors(tmp_path / "one.safetensors", _vectors(1))
    save_embedding_pt(tmp_path / "sub" / "two.pt", _vectors(2))
    (tmp_path / "notes.txt").write_text("not an embedding")
    names = [e.name for e in load_embeddings([tmp_path])]
    assert sorted(names) == ["one", "two"]
    save_embedding_pt(tmp_path / "sub" / "One.pt", _vectors(1))
    with pytest.raises(ModelLoadError, match="already used"):
        load_embeddings([tmp_path])
    with pytest.raises(ModelLoadError, match="no such embedding file or folder"):
        load_embeddings([tmp_path / "nope"])


def test_prompt_expansion_is_whole_word_and_case_insensitive():
    token_map = {"bad-hands": vector_token_names("bad-hands", 3), "neg": ["neg"]}
    assert vector_token_names("x", 3) == ["x", "x1", "x2"]
    assert expand_embedding_names("(Bad-Hands:1.2), bad-handsome", token_map) == \
        "(bad-hands bad-hands1 bad-hands2:1.2), bad-handsome"
    assert embeddings_in_text("a, NEG", ["neg", "bad-hands"]) == ["neg"]


@pytest.fixture(scope="module")
def tiny_text_model(tiny_single_file):
    from library.models.loading import load_sd1

    model = load_sd1(tiny_single_file)
    return model.tokenizer, model.text_encoder


def test_multi_vector_tokens_match_the_file(tiny_text_model, tmp_path):
    tokenizer, text_encoder = copy.deepcopy(tiny_text_model[0]), copy.deepcopy(tiny_text_model[1])
    width = text_encoder.get_input_embeddings().weight.shape[1]
    vectors = _vectors(3, width, seed=3)
    save_embedding_safetensors(tmp_path / "MyStyle.safetensors", vectors)
    embedding = load_embedding(tmp_path / "MyStyle.safetensors", expected_width=width)
    before = len(tokenizer)

    token_map = add_embeddings(tokenizer, text_encoder, [embedding])
    assert token_map == {"MyStyle": ["mystyle", "mystyle1", "mystyle2"]}
    assert len(tokenizer) == before + 3
    prompt = expand_embedding_names("a photo in MyStyle, best", token_map)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    new_ids = tokenizer.convert_tokens_to_ids(token_map["MyStyle"])
    start = ids.index(new_ids[0])
    assert ids[start:start + 3] == new_ids
    rows = text_encoder.get_input_embeddings()(torch.tensor(ids[start:start + 3]))
    assert torch.equal(rows, vectors)
    # the words around it are tokenized as before
    assert tokenizer("best", add_special_tokens=False).input_ids[0] in ids

    # adding again (e.g. a resumed run) reuses the tokens and rewrites the rows
    again = add_embeddings(tokenizer, text_encoder, [embedding])
    assert again == token_map and len(tokenizer) == before + 3


def test_token_that_is_a_vocabulary_word_is_refused(tiny_text_model, tmp_path):
    tokenizer, text_encoder = copy.deepcopy(tiny_text_model[0]), copy.deepcopy(tiny_text_model[1])
    width = text_encoder.get_input_embeddings().weight.shape[1]
    save_embedding_safetensors(tmp_path / "hand.safetensors", _vectors(1, width))
    with pytest.raises(ModelLoadError, match="already a word of the CLIP vocabulary"):
        add_embeddings(tokenizer, text_encoder, load_embeddings([tmp_path / "hand.safetensors"]))
    save_embedding_safetensors(tmp_path / "wide.safetensors", _vectors(1, width + 1))
    with pytest.raises(ModelLoadError, match=f"{width + 1} wide.*needs {width}"):
        add_embeddings(tokenizer, text_encoder, load_embeddings([tmp_path / "wide.safetensors"]))
