"""The embedded tiny ViT: the shipped weights (loaded without unpickling code) against the numbers the
training script recorded, the held-out accuracy recomputed on the CNN's split, torchvision's module names,
the forward pass recomputed by hand from the state dict, each module run once, and determinism."""
import io
import math
import pickle
import subprocess
import sys
from importlib import resources

import pytest
import torch
import torch.nn.functional as F

from attrib import IntegratedGradients
from attrib.models import load_digits_vit, make_digits_vit, pixel_bounds, preprocess, sample_digits
from attrib.models.digits import digits_split
from attrib.models.digits_vit import digits_vit_record

PARAMETERS = 139_978   # 1*64*16+64 (conv_proj) + 64 (class token) + 65*64 (positions) + 4*33_472 (blocks) + 128 + 650


def test_shipped_weights_load_with_weights_only_and_match_the_record():
    raw = resources.files("attrib.models").joinpath("digits_vit.pt").read_bytes()
    state = torch.load(io.BytesIO(raw), weights_only=True)
    assert set(state) == set(make_digits_vit().state_dict())
    assert all(value.dtype == torch.float32 for value in state.values())
    assert sum(value.numel() for value in state.values()) == digits_vit_record()["model"]["parameters"] == PARAMETERS
    assert tuple(state["conv_proj.weight"].shape) == (64, 1, 4, 4)   # the grey patch embedding
    assert len(raw) < 1_000_000
    with pytest.raises(pickle.UnpicklingError):   # weights_only refuses anything that is not plain tensors
        torch.load(io.BytesIO(pickle.dumps(make_digits_vit(), protocol=2)), weights_only=True)


def test_held_out_accuracy_recomputed_on_the_cnn_split_is_the_recorded_one():
    pytest.importorskip("sklearn")
    images, labels, _, test = digits_split()
    with torch.no_grad():
        predicted = load_digits_vit()(preprocess(images[test])).argmax(1)
    accuracy = float((predicted == labels[test]).float().mean())
    record = digits_vit_record()["accuracy"]
    assert len(test) == record["n_held_out"] == 450
    assert round(accuracy, 4) == record["held_out"]
    assert accuracy >= 0.95


def test_sample_digits_are_classified_as_recorded():
    images, labels = sample_digits()
    with torch.no_grad():
        predicted = load_digits_vit()(preprocess(images)).argmax(1)
    assert labels.tolist() == list(range(10))
    assert float((predicted == labels).float().mean()) == digits_vit_record()["accuracy"]["samples"] == 1.0


def test_module_names_and_types_are_torchvisions():
    from torchvision.models import VisionTransformer
    from torchvision.models.vision_transformer import EncoderBlock, MLPBlock

    model = load_digits_vit()
    assert type(model) is VisionTransformer and not model.training
    top = [name for name, _ in model.named_children()]
    assert top == ["conv_proj", "encoder", "heads"]
    assert [name for name, _ in model.encoder.named_children()] == ["dropout", "layers", "ln"]
    assert [name for name, _ in model.encoder.layers.named_children()] == [f"encoder_layer_{i}" for i in range(4)]
    block = model.get_submodule("encoder.layers.encoder_layer_0")
    assert isinstance(block, EncoderBlock) and isinstance(block.mlp, MLPBlock)
    assert [name for name, _ in block.named_modules()] == [
        "", "ln_1", "self_attention", "self_attention.out_proj", "dropout", "ln_2", "mlp", "mlp.0", "mlp.1", "mlp.2", "mlp.3", "mlp.4"]
    assert [type(m).__name__ for _, m in block.named_modules()][1:] == [
        "LayerNorm", "MultiheadAttention", "NonDynamicallyQuantizableLinear", "Dropout", "LayerNorm", "MLPBlock",
        "Linear", "GELU", "Dropout", "Linear", "Dropout"]
    attention = block.self_attention
    assert (attention.embed_dim, attention.num_heads, attention.dropout, attention.batch_first) == (64, 4, 0.0, True)
    assert [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)] == [0.0] * 13   # 1 + 3 per block
    conv = model.conv_proj
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (1, 64, (4, 4), (4, 4))
    assert (model.heads.head.in_features, model.heads.head.out_features) == (64, 10)
    assert tuple(model.encoder.pos_embedding.shape) == (1, 65, 64) and tuple(model.class_token.shape) == (1, 1, 64)


def by_hand(state, x):
    """The ViT of arXiv:2010.11929 (pre-norm blocks, class token) written out from the state dict."""
    def norm(h, prefix):
        return F.layer_norm(h, (64,), state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-6)

    patches = F.conv2d(x, state["conv_proj.weight"], state["conv_proj.bias"], stride=4)   # (B, 64, 8, 8)
    h = torch.cat([state["class_token"].expand(len(x), 1, 64), patches.flatten(2).transpose(1, 2)], 1)
    h = h + state["encoder.pos_embedding"]
    for i in range(4):
        p = f"encoder.layers.encoder_layer_{i}"
        q, k, v = (norm(h, f"{p}.ln_1") @ state[f"{p}.self_attention.in_proj_weight"].T
                   + state[f"{p}.self_attention.in_proj_bias"]).split(64, dim=-1)
        q, k, v = (t.reshape(len(x), 65, 4, 16).transpose(1, 2) for t in (q, k, v))   # 4 heads of 16
        mixed = ((q @ k.transpose(-1, -2)) / math.sqrt(16)).softmax(-1) @ v
        mixed = mixed.transpose(1, 2).reshape(len(x), 65, 64)
        h = h + mixed @ state[f"{p}.self_attention.out_proj.weight"].T + state[f"{p}.self_attention.out_proj.bias"]
        hidden = F.gelu(norm(h, f"{p}.ln_2") @ state[f"{p}.mlp.0.weight"].T + state[f"{p}.mlp.0.bias"])
        h = h + hidden @ state[f"{p}.mlp.3.weight"].T + state[f"{p}.mlp.3.bias"]
    return norm(h, "encoder.ln")[:, 0] @ state["heads.head.weight"].T + state["heads.head.bias"]


def test_forward_is_the_vit_written_out_by_hand():
    model = load_digits_vit()
    x = preprocess(sample_digits()[0])
    with torch.no_grad():
        expected = by_hand(model.state_dict(), x)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        model.train()   # the training-mode path (no fused attention) is the same function: dropout is 0
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_eval_forward_is_deterministic_rows_independent_and_calls_each_module_once():
    model = load_digits_vit()
    x = preprocess(sample_digits()[0])
    calls: dict[str, int] = {}
    handles = [module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
               for name, module in model.named_modules() if name]
    with torch.no_grad():
        first, second = model(x), model(x)
    for handle in handles:
        handle.remove()
    assert torch.equal(first, second)
    # every module twice (once per pass), except out_proj: MultiheadAttention applies its weights itself
    out_proj = {f"encoder.layers.encoder_layer_{i}.self_attention.out_proj" for i in range(4)}
    expected = {name: 2 for name, _ in model.named_modules() if name and name not in out_proj}
    assert calls == expected and len(expected) == 4 + 4 * 12 + 3 - 4 == 51
    with torch.no_grad():
        alone = model(x[3:4])
    torch.testing.assert_close(alone, first[3:4], rtol=1e-5, atol=1e-5)


def test_untrained_model_predicts_zero_and_importing_models_does_not_import_torchvision():
    torch.manual_seed(0)
    untrained = make_digits_vit()
    with torch.no_grad():   # torchvision initialises the head at zero
        assert float(untrained(preprocess(sample_digits()[0])).abs().max()) == 0.0
    code = "import sys, attrib.models; print('torchvision' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_integrated_gradients_is_complete_on_the_vit():
    model = load_digits_vit()
    images, labels = sample_digits()
    x = preprocess(images[[3, 8]])
    result = IntegratedGradients(model).attribute(x, target=labels[[3, 8]], baselines=pixel_bounds()[0], n_steps=64)
    gap = result.outputs - result.baseline_outputs   # about 4.3 and 5.6 logits from a blank digit
    assert float(gap.min()) > 1.0
    # completeness (an axiom): the attributions add up to the change of the logit, to 1e-3 of it at 64 nodes
    torch.testing.assert_close(result.attributions.sum((1, 2, 3)), gap, rtol=0, atol=1e-3 * float(gap.abs().max()))
