"""``esvit-export --format safetensors|pt|onnx|torchscript``: standard files that load without
esvit, a JSON card beside each, extensions that must match, and esvit reading them back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_embed_export import make_training_checkpoint

from esvit.backbones import torchvision_equivalent
from esvit.cli.export import main as export_main
from esvit.export import export_backbone, load_backbone


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    path = tmp_path_factory.mktemp("ck") / "checkpoint.pt"
    return path, make_training_checkpoint(path, "cifar_resnet18", {})


def _ref(trainer: object, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return trainer.teacher.backbone(x)[0]


@pytest.mark.parametrize("ext", [".safetensors", ".pt"])
def test_weights_load_into_plain_torchvision_and_back_into_esvit(ckpt, tmp_path: Path, ext: str) -> None:
    path, trainer = ckpt
    out = export_backbone(path, tmp_path / f"backbone{ext}")
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["backbone"] == "cifar_resnet18" and card["file_format"] == ext[1:]
    assert card["input"]["mean"] and card["eval_protocol"]["center_crop"] == 32
    if ext == ".pt":
        state = torch.load(out, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(str(out))
    tv = torchvision_equivalent("cifar_resnet18").eval()
    tv.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(tv(x), _ref(trainer, x), atol=1e-5, rtol=1e-5)
    net, spec = load_backbone(out)  # the card names the backbone: no --backbone needed
    assert spec.name == "cifar_resnet18"
    torch.testing.assert_close(net(x), tv(x))


def test_timm_export_loads_into_timm_create_model(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    path = tmp_path / "ck.pt"
    make_training_checkpoint(path, "timm/resnet18", {})
    out = export_backbone(path, tmp_path / "bb.pt")
    net = timm.create_model("resnet18", num_classes=0)
    net.load_state_dict(torch.load(out, weights_only=True), strict=True)
    assert "timm.create_model('resnet18', num_classes=0)" in json.loads(out.with_suffix(".json").read_text())["constructor"]


def test_onnx_export_is_checked_against_pytorch(ckpt, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    path, trainer = ckpt
    out = export_backbone(path, tmp_path / "bb.onnx")
    onnx.checker.check_model(onnx.load(str(out)))
    x = torch.randn(3, 3, 32, 32)  # another batch size than the export's example
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(got), _ref(trainer, x), atol=1e-4, rtol=1e-4)


def test_torchscript_export_runs_without_esvit_classes(ckpt, tmp_path: Path) -> None:
    path, trainer = ckpt
    out = export_backbone(path, tmp_path / "bb.ts")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(torch.jit.load(str(out))(x), _ref(trainer, x), atol=1e-5, rtol=1e-5)


def test_mismatched_extension_and_unknown_format_are_one_line_errors(ckpt, tmp_path: Path, capsys) -> None:
    path, _ = ckpt
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "x.safetensors"), "--format", "pt"]) == 2
    err = capsys.readouterr().err
    assert "does not match the extension .safetensors" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()  # today's pickle-in-a-.safetensors is gone
    assert export_main(["--checkpoint", str(path), "--out", str(tmp_path / "x.bin")]) == 2
    assert "unknown extension '.bin'" in capsys.readouterr().err


def test_deployment_formats_are_not_read_back(ckpt, tmp_path: Path) -> None:
    from esvit.train.checkpoint import CheckpointError

    out = export_backbone(ckpt[0], tmp_path / "bb.ts")
    with pytest.raises(CheckpointError, match="deployment format"):
        load_backbone(out)
