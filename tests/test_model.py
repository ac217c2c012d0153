"""The batched GPT against the lecture's per-head model, state-dict loading, compile."""
import pytest
import torch

from lecture_flash.gpt import GPT, GPTConfig, MultiHeadAttention
from lecture_flash.gpt.lecture import GPTLanguageModel
from lecture_flash.gpt.lecture import MultiHeadAttention as LectureMHA

CFG = dict(vocab_size=65, block_size=32, n_embd=48, n_head=4, n_layer=2, dropout=0.0)


def lecture_pair(dtype=torch.float64, **over):
    cfg = {**CFG, **over}
    torch.manual_seed(0)
    lecture = GPTLanguageModel(**cfg).to(dtype).eval()
    ours = GPT(GPTConfig(**cfg)).to(dtype).eval()
    ours.load_state_dict(lecture.state_dict())  # strict
    return lecture, ours


def test_lecture_state_dict_loads_and_gives_the_same_logits():
    lecture, ours = lecture_pair()
    idx = torch.randint(65, (3, 32))
    targets = torch.randint(65, (3, 32))
    lec_logits, lec_loss = lecture(idx, targets)
    logits, loss = ours(idx, targets)
    torch.testing.assert_close(logits.view(-1, 65), lec_logits, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, lec_loss, rtol=1e-12, atol=1e-12)


def test_float32_lecture_checkpoint_round_trip(tmp_path):
    lecture, _ = lecture_pair(torch.float32)
    path = tmp_path / "lecture.pt"
    torch.save(lecture.state_dict(), path)  # what the lecture's gpt.py would save
    ours = GPT(GPTConfig(**CFG)).eval()
    ours.load_state_dict(torch.load(path))
    idx = torch.randint(65, (2, 20))
    torch.testing.assert_close(ours(idx)[0], lecture(idx)[0], rtol=1e-5, atol=1e-5)
    reloaded = GPT(GPTConfig(**CFG)).eval()
    reloaded.load_state_dict(ours.state_dict())  # and our own fused layout
    assert torch.equal(reloaded(idx)[0], ours(idx)[0])


def test_lecture_model_scaled_by_n_embd_loads_with_scale():
    torch.manual_seed(1)
    lecture = GPTLanguageModel(**CFG, scale_by="n_embd").double().eval()
    ours = GPT(GPTConfig(**CFG, attn_scale=CFG["n_embd"] ** -0.5)).double().eval()
    ours.load_state_dict(lecture.state_dict())
    idx = torch.randint(65, (2, 16))
    torch.testing.assert_close(ours(idx)[0], lecture(idx)[0], rtol=1e-12, atol=1e-12)


def test_multihead_attention_is_a_drop_in_for_the_lecture_module():
    torch.manual_seed(2)
    lec = LectureMHA(48, 4, 12, 32, 0.0).double()
    ours = MultiHeadAttention(4, 12, 48).double()  # the lecture's (num_heads, head_size) order
    ours.load_state_dict(lec.state_dict())
    x = torch.randn(2, 32, 48, dtype=torch.float64)
    torch.testing.assert_close(ours(x), lec(x), rtol=1e-12, atol=1e-12)


def test_incomplete_lecture_heads_are_reported():
    lec = LectureMHA(48, 4, 12, 32, 0.0)
    state = lec.state_dict()
    del state["heads.3.value.weight"]
    with pytest.raises(ValueError, match="heads"):
        MultiHeadAttention(4, 12, 48).load_state_dict(state)


def test_context_longer_than_block_size_is_refused():
    _, ours = lecture_pair()
    with pytest.raises(ValueError, match="block_size is 32"):
        ours(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("bad, words", [(dict(n_embd=50), "divisible"), (dict(dropout=1.0), "dropout"),
                                        (dict(n_layer=0), "n_layer")])
def test_bad_config(bad, words):
    with pytest.raises(ValueError, match=words):
        GPTConfig(**{**CFG, **bad})


def test_dropout_only_in_training():
    torch.manual_seed(3)
    model = GPT(GPTConfig(**{**CFG, "dropout": 0.2}))
    idx = torch.randint(65, (2, 16))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_compiles_with_fullgraph_and_no_graph_breaks():
    torch.manual_seed(4)
    model = GPT(GPTConfig(**{**CFG, "dropout": 0.1}))
    idx, targets = torch.randint(65, (2, 32)), torch.randint(65, (2, 32))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    _, loss = compiled(idx, targets)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    explanation = torch._dynamo.explain(model)(idx, targets)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_presets_are_one_table_for_model_train_and_bench():
    from lecture_flash.gpt.model import PRESETS
    from lecture_flash.gpt.train import preset_settings
    assert GPTConfig.from_preset("lecture") == GPTConfig()  # the lecture's final gpt.py
    small = GPTConfig.from_preset("small", vocab_size=80)
    assert (small.block_size, small.n_embd, small.n_head, small.n_layer, small.vocab_size) == (32, 64, 4, 4, 80)
    from lecture_flash.gpt.model import TRAIN_DEFAULTS
    assert preset_settings("tiny") == {**PRESETS["tiny"]["model"], **TRAIN_DEFAULTS,
                                       **PRESETS["tiny"]["train"]}
    assert GPTConfig.from_preset("speedrun") == GPTConfig()  # the lecture's model: its checkpoints
    assert preset_settings("lecture")["n_embd"] == 384 and preset_settings("lecture")["batch_size"] == 64
    with pytest.raises(ValueError, match="preset must be one of"):
        GPTConfig.from_preset("huge")
