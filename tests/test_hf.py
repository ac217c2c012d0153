"""lecture_flash.hf: our attention registered in Hugging Face transformers' attention interface, on
tiny models built from a config (nothing downloaded), against transformers' own "sdpa"."""
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (CI "
                                   "installs it with the test extras)")
import lecture_flash  # noqa: E402
import lecture_flash.hf  # noqa: E402


def build(kind, attn_implementation, dropout=0.0):
    """A tiny GPT-2, or a tiny Llama with grouped-query heads (4 query heads, 2 key/value
    heads), the same weights for every attn_implementation; dropout: the attention's (the
    rest has none, so that train mode is deterministic)."""
    torch.manual_seed(0)
    if kind == "gpt2":
        config = transformers.GPT2Config(vocab_size=61, n_positions=64, n_embd=32, n_layer=2,
                                         n_head=4, bos_token_id=0, eos_token_id=0,
                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=dropout)
        model = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64,
                                          bos_token_id=0, eos_token_id=0,
                                          attention_dropout=dropout)
        model = transformers.LlamaForCausalLM(config)
    model.set_attn_implementation(attn_implementation)
    return model


def padded_batch(side):
    torch.manual_seed(1)
    ids = torch.randint(1, 61, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    if side == "right":
        mask[1, 6:], mask[2, 3:] = 0, 0
    elif side == "left":
        mask[1, :4], mask[2, :7] = 0, 0
    return ids, mask


@pytest.mark.parametrize("kind, side, backend", [
    ("llama", "left", "triton"), ("gpt2", "right", "auto"),
    ("llama", "right", "auto"), ("llama", "none", "auto")])
def test_logits_and_gradients_match_sdpa_on_a_padded_batch(kind, side, backend):
    """Our attention in the model's place: logits of the real positions and every parameter's
    gradient as transformers' "sdpa" gives them. The Triton kernel (under the interpreter on
    CPU) takes the left-padded batch of the grouped-query Llama; the others take "auto" (on CPU,
    PyTorch's SDPA under our masks), quicker here, through the same registration."""
    name = lecture_flash.hf.register(f"lecture_{backend}", backend=backend)
    ours, theirs = build(kind, name), build(kind, "sdpa")
    ids, mask = padded_batch(side)
    labels = ids.masked_fill(mask == 0, -100)  # padded positions are not trained on
    got, want = (m(ids, attention_mask=mask, labels=labels) for m in (ours, theirs))
    real = mask.bool()
    torch.testing.assert_close(got.logits[real], want.logits[real], atol=2e-5, rtol=2e-5)
    got.loss.backward()
    want.loss.backward()
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=2e-5, rtol=2e-5, msg=n)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_greedy_generate_matches_sdpa(kind, cache):
    """Greedy generation of a left-padded batch (as generate pads prompts), with a dynamic and a
    static cache (whose empty slots the mask function cuts off): the same tokens, and scores
    equal to rounding."""
    name = lecture_flash.hf.register()
    ours, theirs = build(kind, name).eval(), build(kind, "sdpa").eval()
    torch.manual_seed(2)
    prompts = torch.randint(1, 61, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    options = dict(max_new_tokens=8, do_sample=False, attention_mask=mask, pad_token_id=0,
                   output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        options["cache_implementation"] = "static"
    got, want = (m.generate(prompts, **options) for m in (ours, theirs))
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.scores, want.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_sliding_window_model_runs_ours_with_its_window(monkeypatch):
    """A tiny Mistral with a 4-key sliding window: its layers run causal_attention with
    window=(3, 0) (the mask function recognises the sliding-window pattern), logits on a padded
    batch and greedy generation with dynamic and static caches as "sdpa" gives them."""
    windows = []
    real = lecture_flash.hf.causal_attention
    monkeypatch.setattr(lecture_flash.hf, "causal_attention",
                        lambda *a, **kw: (windows.append(kw["window"]), real(*a, **kw))[1])

    def mistral(impl):
        torch.manual_seed(0)
        model = transformers.MistralForCausalLM(transformers.MistralConfig(
            vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            sliding_window=4, bos_token_id=0, eos_token_id=0))
        model.set_attn_implementation(impl)
        return model.eval()

    ours, theirs = mistral(lecture_flash.hf.register()), mistral("sdpa")
    ids, mask = padded_batch("left")
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                               theirs(ids, attention_mask=mask).logits[mask.bool()],
                               atol=1e-5, rtol=1e-5)
    assert windows and set(windows) == {(3, 0)}
    prompts = torch.randint(1, 61, (2, 9))
    options = dict(max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(prompts),
                   pad_token_id=0)
    for cache in ("dynamic", "static"):
        extra = {"cache_implementation": "static"} if cache == "static" else {}
        assert torch.equal(ours.generate(prompts, **options, **extra),
                           theirs.generate(prompts, **options, **extra)), cache


def test_padding_is_found_once_per_forward(monkeypatch):
    """The packing of a padded batch (a host read) is worked out by the first layer and kept on
    the mask tensor every layer shares."""
    found = []
    nonzero = torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero",
                        lambda t, *a, **kw: (found.append(1), nonzero(t, *a, **kw))[1])
    model = build("llama", lecture_flash.hf.register()).eval()
    ids, mask = padded_batch("right")
    model(ids, attention_mask=mask)
    assert len(found) == 2  # the keys' rows and the queries', once for the model's 2 layers


def test_output_attentions_and_dropout_are_taken():
    """output_attentions=True runs (no weights come back, as with "sdpa"), and training-mode
    attention dropout reaches the kernel."""
    name = lecture_flash.hf.register()
    model = build("llama", name, dropout=0.5)
    ids, mask = padded_batch("right")
    out = model.eval()(ids, attention_mask=mask, output_attentions=True)
    assert out.logits.isfinite().all()
    model.train()
    torch.manual_seed(3)
    a = model(ids).logits
    torch.manual_seed(4)
    assert not torch.equal(a, model(ids).logits)  # dropout draws differ


def test_names_with_flash_are_refused():
    with pytest.raises(ValueError, match="must not contain 'flash'"):
        lecture_flash.hf.register("my_flash")


def test_a_failing_transformers_import_reports_its_real_cause(monkeypatch):
    """transformers present but its attention interface failing to import (here: a `kernels`
    that is not Hugging Face's, as a folder named kernels/ on sys.path would give): the error
    names the version, the tested ones, the shadowing module, and chains the real exception."""
    import importlib.machinery
    import sys
    import types
    shadow = types.ModuleType("kernels")
    shadow.__spec__ = importlib.machinery.ModuleSpec("kernels", None)  # find_spec reads it
    monkeypatch.setitem(sys.modules, "kernels", shadow)
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)  # `import` raises
    with pytest.raises(ImportError, match=f"from transformers {transformers.__version__}") as e:
        lecture_flash.hf.register()
    message = str(e.value)
    assert "tested with 4.57.6, 5.0.0, 5.25.0" in message, message
    assert "is not Hugging Face's: a folder named kernels/ on sys.path shadows it" in message, message
    assert isinstance(e.value.__cause__, ImportError), e.value.__cause__


def test_a_missing_transformers_says_how_to_install_it(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"needs transformers \(pip install 'lecture-flash\[hf\]'"):
        lecture_flash.hf.register()


@pytest.mark.parametrize("version", ["4.57.6", "5.25.0"])
def test_non_causal_calls_are_refused(monkeypatch, version):
    """An encoder's or a cross-attention's module, or is_causal=False for full attention, is
    refused with the reason; transformers 4.x's GPT-2 passes is_causal=False for a causal
    module whenever it gives a mask (its SDPA flag), which must still run."""
    import sys
    import types
    # (building a model can leave another transformers module object in sys.modules)
    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)
    q = k = v = torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 5, dtype=torch.bool)
    refused = [(types.SimpleNamespace(is_causal=False), None, None),
               (types.SimpleNamespace(is_causal=True, is_cross_attention=True), None, None),
               (types.SimpleNamespace(is_causal=True), None, False)]
    if version.startswith("5."):
        refused.append((types.SimpleNamespace(is_causal=True), mask, False))
    for module, attention_mask, is_causal in refused:
        with pytest.raises(ValueError, match="is not causal attention"):
            lecture_flash.hf.attention_forward(module, q, k, v, attention_mask, is_causal=is_causal)
    if version.startswith("4."):
        out, _ = lecture_flash.hf.attention_forward(types.SimpleNamespace(is_causal=True), q, k, v,
                                                    mask, is_causal=False)
        ref = lecture_flash.causal_attention(q, k, v).transpose(1, 2)
        torch.testing.assert_close(out, ref)
