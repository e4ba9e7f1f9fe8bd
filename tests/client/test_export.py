"""ONNX export: the device serves the very 4-bit codes it trained on, plus the federated adapter."""

import json

import numpy as np
import onnx
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import numpy_helper

from client.export import DONE, ExportError, ExportOptions, export_base
from client.onnx_adapter import AdapterError, base_tensors, lora_scale, onnx_lora_tensors
from shared.adapter import ADAPTER_WEIGHTS, adapter_config_bytes, adapter_state, attach_lora, load_adapter_state
from shared.config import LoraConfig
from shared.int4_layer import INT4_WEIGHTS
from shared.model import load_model
from shared.release import make_release, save_tensors, write_release
from shared.sign import TrustList

KEY = Ed25519PrivateKey.generate()
TRUST = TrustList.of(KEY.public_key())
EXACT = ExportOptions(accuracy_level=0)  # float32 activations: compared with PyTorch closely


def device_model(base):
    """What the device trains: the 4-bit base in PyTorch with a LoRA adapter (rank 4)."""
    return attach_lora(load_model(str(base), torch.float32), LoraConfig(rank=4), seed=0).eval()


def trained_state(model, seed):
    """A LoRA state as after training: B no longer zero."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in adapter_state(model).items()}


def signed_adapter(folder, model, state, base, round=1, base_digest=None, key=KEY):
    """Write a signed adapter release folder (the shape the server's registry writes)."""
    files = {"adapter_config.json": adapter_config_bytes(model, str(base)), ADAPTER_WEIGHTS: save_tensors(state)}
    release, manifest = make_release(
        files, kind="adapter", run_id="run", round=round, base_digest=base_digest, method="ties", key=key
    )
    return write_release(release, folder), manifest


def test_the_onnx_model_holds_the_codes_the_device_trained_on(edge_base):
    from safetensors.torch import load_file

    graph = onnx.load(str(edge_base.export / "model.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    codes = load_file(edge_base.base / INT4_WEIGHTS)
    layers = json.loads((edge_base.export / DONE).read_text())["lora_layers"]
    assert len(layers) == 2 * 4  # per block: packed qkv, o, packed gate+up, down
    for layer, info in layers.items():
        for t, name in (("qweight", "q4"), ("scales", "scales")):
            ours = torch.cat([codes[f"{m}.{t}"] for m in info["modules"]]).float().numpy()
            assert np.array_equal(inits[f"{layer}.{name}"].astype(np.float32), ours), (layer, t)
    embed = (codes["model.embed_tokens.qweight8"].to(torch.int16) + 128).numpy()
    assert np.array_equal(inits["embed.q8"], embed)  # embedding and tied output layer: the 8-bit codes
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == len(layers) + 1  # every linear layer and the output layer
    assert ops.count("Split") == ops.count("QuickGelu") == 2 and "Sigmoid" not in ops  # gate+up packed, SiLU fused
    weights = [n for n in graph.node if n.op_type in ("MatMul", "Gemm", "Gather") and n.input[1] in inits]
    assert all(inits[n.input[1]].size < 64 * 128 for n in weights), "a float weight matrix is left in the graph"


def test_onnx_with_the_adapter_matches_pytorch_on_the_same_4bit_base(edge_base, tokenizer):
    from client.infer import EdgeModel

    model = device_model(edge_base.base)
    state = trained_state(model, 1)
    folder, _ = signed_adapter(edge_base.root / "r1", model, state, edge_base.base, base_digest=edge_base.digest)
    load_adapter_state(model, state)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    edge.apply_release(folder)
    for prompt in ("Define 'otter'.", "What kind of thing is a bagel?", "Define 'to stroll'."):
        ids = edge.prompt_ids(prompt)
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0, -1].numpy()
            with model.disable_adapter():
                ref_base = model(torch.tensor([ids])).logits[0, -1].numpy()
            greedy = model.generate(torch.tensor([ids]), max_new_tokens=10, do_sample=False, eos_token_id=2)
        tol = 3e-3 * np.abs(ref).max()  # float32 sums in another order (and the block-sum correction)
        np.testing.assert_allclose(edge.logits(ids), ref, rtol=0, atol=tol)
        np.testing.assert_allclose(edge.logits(ids, adapter=False), ref_base, rtol=0, atol=tol)
        assert np.abs(ref - ref_base).max() > 10 * tol  # the adapter changes what is compared
        tokens = [t for _, t in edge.generate_tokens(ids, 10)]
        assert tokens == greedy[0, len(ids) :].tolist()[: len(tokens)] and tokens


def test_refused_adapters_leave_the_active_one_and_a_new_one_swaps_in_without_a_rebuild(edge_base):
    from client.infer import EdgeModel
    from shared.release import ReleaseError

    model = device_model(edge_base.base)
    edge = EdgeModel(edge_base.base, TRUST, edge_base.root / "cache", threads=1, options=EXACT)
    good, m1 = signed_adapter(
        edge_base.root / "a1", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest
    )
    edge.apply_release(good)
    ids = edge.prompt_ids("Define 'hammer'.")
    before, graph = edge.logits(ids), (edge.folder / "model.onnx").stat().st_mtime_ns

    def refused(folder, reason):
        with pytest.raises(ReleaseError, match=reason):
            edge.apply_release(folder)
        assert edge.active is not None and edge.active.manifest == m1
        np.testing.assert_array_equal(edge.logits(ids), before)

    state2 = trained_state(model, 2)
    other_base, _ = signed_adapter(edge_base.root / "b", model, state2, edge_base.base, 2, "c" * 64)
    refused(other_base, "for base model")
    corrupt, _ = signed_adapter(edge_base.root / "c", model, state2, edge_base.base, 2, edge_base.digest)
    data = bytearray((corrupt / ADAPTER_WEIGHTS).read_bytes())
    data[-3] ^= 0x40
    (corrupt / ADAPTER_WEIGHTS).write_bytes(bytes(data))
    refused(corrupt, "SHA-256")
    bad_sig, _ = signed_adapter(edge_base.root / "d", model, state2, edge_base.base, 2, edge_base.digest)
    (bad_sig / "manifest.sig").write_bytes(bytes(64))
    refused(bad_sig, "signature")
    rogue, _ = signed_adapter(
        edge_base.root / "e", model, state2, edge_base.base, 2, edge_base.digest, Ed25519PrivateKey.generate()
    )
    refused(rogue, "trust list")
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if "lora_A" in k else v for k, v in state2.items()}
    misfit, _ = signed_adapter(edge_base.root / "f", model, wide, edge_base.base, 2, edge_base.digest)
    refused(misfit, "does not fit")
    older, _ = signed_adapter(edge_base.root / "g", model, state2, edge_base.base, 0, edge_base.digest)
    refused(older, "older than the active round 1")

    newer, m2 = signed_adapter(edge_base.root / "a2", model, state2, edge_base.base, 2, edge_base.digest)
    onnx_model = edge.model
    assert edge.apply_release(newer) == m2 and edge.active is not None and edge.active.manifest == m2
    load_adapter_state(model, state2)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].numpy()
    np.testing.assert_allclose(edge.logits(ids), ref, rtol=0, atol=3e-3 * np.abs(ref).max())
    assert edge.model is onnx_model and (edge.folder / "model.onnx").stat().st_mtime_ns == graph  # no rebuild


def test_packed_qkv_adapter_computes_each_modules_own_update():
    k, r, outs = 64, 2, [4, 2, 2]
    mods = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    g = torch.Generator().manual_seed(0)
    state = {}
    for m, n in zip(mods, outs, strict=True):
        state[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, k, generator=g)
        state[f"base_model.model.{m}.lora_B.weight"] = torch.randn(n, r, generator=g)
    layer = "model.layers.0.attn.qkv_proj"
    layers = {layer: {"in": k, "out": outs, "modules": mods}}
    c = torch.randn(k // 32, sum(outs), generator=g).numpy()
    corr = {layer: c}

    def branch(x, t):  # what the graph computes: [block sums of x | x @ A] @ [C ; B]
        sums = x.reshape(len(x), k // 32, 32).sum(-1)
        return np.concatenate([sums, x @ t[f"{layer}.lora_A"]], axis=1) @ t[f"{layer}.lora_B"]

    t = onnx_lora_tensors(state, 2.0, layers, corr)
    x = torch.randn(3, k, generator=g)
    correction = x.numpy().reshape(3, k // 32, 32).sum(-1) @ c  # the base's exact part
    got = branch(x.numpy(), t) - correction
    a, b = (
        (lambda m: state[f"base_model.model.{m}.lora_A.weight"]),
        (lambda m: state[f"base_model.model.{m}.lora_B.weight"]),
    )
    want = torch.cat([2.0 * x @ a(m).T @ b(m).T for m in mods], dim=1)  # PEFT: (alpha / r) * B A x per module
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(branch(x.numpy(), base_tensors(corr)), correction, rtol=1e-5, atol=1e-5)  # base alone
    partial = onnx_lora_tensors({k_: v for k_, v in state.items() if "v_proj" not in k_}, 2.0, layers, corr)
    got = branch(x.numpy(), partial) - correction
    np.testing.assert_allclose(got[:, 6:], 0.0)  # an adapter without v_proj: zeros there
    np.testing.assert_allclose(got[:, :6], want[:, :6].numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="no LoRA input"):
        head = {
            "base_model.model.lm_head.lora_A.weight": torch.ones(r, k),
            "base_model.model.lm_head.lora_B.weight": torch.ones(3, r),
        }
        onnx_lora_tensors({**state, **head}, 2.0, layers, corr)
    with pytest.raises(AdapterError, match="only one LoRA factor"):
        onnx_lora_tensors({f"base_model.model.{mods[0]}.lora_A.weight": torch.ones(r, k)}, 2.0, layers, corr)
    with pytest.raises(AdapterError, match=r"this graph serves r = 3 \(adapter_config.json\)"):
        onnx_lora_tensors(state, 2.0, layers, corr, rank=3)  # the config's r: the scale is alpha / r
    q_a = f"base_model.model.{mods[0]}.lora_A.weight"
    with pytest.raises(AdapterError, match="two lora_A.weight tensors for"):  # was: one of them silently dropped
        onnx_lora_tensors({**state, q_a.removeprefix("base_model.model."): state[q_a]}, 2.0, layers, corr)
    empty = {
        f"base_model.model.{mods[0]}.lora_A.weight": torch.ones(0, k),
        f"base_model.model.{mods[0]}.lora_B.weight": torch.ones(4, 0),
    }
    with pytest.raises(AdapterError, match="lora_A of rank 0"):
        onnx_lora_tensors(empty, 2.0, layers, corr)
    wide = {  # rank 3 on k_proj, a 64 -> 2 layer: no update of rank 3 exists there
        f"base_model.model.{mods[1]}.lora_A.weight": torch.ones(3, k),
        f"base_model.model.{mods[1]}.lora_B.weight": torch.ones(2, 3),
    }
    with pytest.raises(AdapterError, match=r"a rank is at most 2 there"):
        onnx_lora_tensors(wide, 2.0, layers, corr)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        (b'{"r": 8, "lora_alpha": 16, "use_dora": true}', "use_dora"),
        (b'{"r": 8, "lora_alpha": 16, "rank_pattern": {"q_proj": 4}}', "rank_pattern"),
        (b"not json", "not a PEFT"),
        (b'{"r": 8, "lora_alpha": 1e12}', r"scales the update by 1.25e\+11: refused"),  # served: every logit 0
        (b'{"r": 8, "lora_alpha": Infinity}', "lora_alpha = inf"),  # served: NaN logits
        (b'{"r": 4096, "lora_alpha": 4096000, "use_rslora": true}', "scales the update by 64000: refused"),
        (b'{"r": 8, "lora_alpha": NaN}', "lora_alpha = nan"),
        (b'{"r": 8, "lora_alpha": -16}', "lora_alpha = -16"),
        (b'{"r": 1e400, "lora_alpha": 16}', "r = inf"),  # int(inf) raised OverflowError
        (b'{"r": 8.5, "lora_alpha": 16}', "r = 8.5"),
    ],
)
def test_adapters_the_graph_cannot_serve_exactly_are_refused(config, reason):
    with pytest.raises(AdapterError, match=reason):
        lora_scale(config)
    assert (
        lora_scale(b'{"r": 8, "lora_alpha": 16}') == 2.0
        and lora_scale(b'{"r": 4, "lora_alpha": 8, "use_rslora": true}') == 4.0
    )


def test_export_refuses_a_folder_that_is_not_a_4bit_base(tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="not a 4-bit base"):
        export_base(tiny_model_dir, tmp_path)


def test_fleetlora_infer_answers_with_the_latest_release_and_refuses_a_bad_one(edge_base, tmp_path, capsys):
    from shared.cli import main
    from shared.sign import public_line

    trust = tmp_path / "trust.pub"
    trust.write_text(public_line(KEY.public_key()) + "\n")
    model = device_model(edge_base.base)
    run = tmp_path / "run"
    signed_adapter(run / "round-0001", model, trained_state(model, 1), edge_base.base, 1, edge_base.digest)
    (run / "LATEST").write_text("round-0001\n")
    common = ["--base", str(edge_base.base), "--trust", str(trust), "--cache", str(edge_base.root / "cache")]
    assert main(["infer", *common, "--adapter", str(run), "--max-new-tokens", "4", "Define 'otter'."]) == 0
    out = capsys.readouterr()
    assert "run run round 1" in out.err and out.out.strip()  # the release in use is named; an answer printed

    (run / "round-0001" / ADAPTER_WEIGHTS).write_bytes(b"\0" * 64)
    assert main(["infer", *common, "--adapter", str(run), "Define 'otter'."]) == 2
    assert "SHA-256" in capsys.readouterr().err  # refused with its reason, nothing answered with it
    assert main(["infer", *common, "Define 'otter'."]) == 2
    assert "--no-adapter" in capsys.readouterr().err


def test_a_4bit_output_layer_is_the_trained_8bit_one_rounded_to_4_bits(edge_base):
    from safetensors.torch import load_file

    folder = export_base(edge_base.base, edge_base.root / "cache", ExportOptions(accuracy_level=0, output_bits=4))
    graph = onnx.load(str(folder / "model.onnx")).graph
    head = next(n for n in graph.node if n.name == "/lm_head/MatMulNBits")
    assert next(a.i for a in head.attribute if a.name == "bits") == 4
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    packed, step = inits["lm_head.q4"], inits["lm_head.scales"]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:2], 32).astype(np.float32)
    served = (codes - 8) * step[..., None]  # MatMulNBits' symmetric dequantization
    t = load_file(edge_base.base / INT4_WEIGHTS)
    trained = (t["model.embed_tokens.qweight8"].float() * t["model.embed_tokens.scales"].float()[..., None]).numpy()
    assert np.all(np.abs(served - trained) <= step[..., None] / 2 + 1e-6)  # within half a 4-bit step
    assert np.abs(served - trained).max() > 0  # and not the trained weights: the benchmark reports the cost
    assert np.array_equal(inits["embed.q8"], (t["model.embed_tokens.qweight8"].to(torch.int16) + 128).numpy())
