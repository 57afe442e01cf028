"""Export of any valid Switch checkpoint, and nothing left behind when it is killed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from swapmoe_edge.core.errors import CheckpointError  # noqa: E402
from swapmoe_edge.artifact.manifest import load_manifest  # noqa: E402
from swapmoe_edge.artifact.model_config import ModelConfig  # noqa: E402
from swapmoe_export import export_checkpoint  # noqa: E402

from tiny import save_tiny  # noqa: E402


def _sparse(art: Path, stack: str) -> list[int]:
    return [e.key.layer for e in load_manifest(art).sparse_layers() if e.key.stack == stack]


@pytest.mark.parametrize("cfg", [
    dict(num_layers=4, encoder_sparse_step=2),
    dict(num_layers=4),
    dict(num_layers=4, num_sparse_encoder_layers=2),
    dict(num_layers=4, num_sparse_encoder_layers=1, encoder_sparse_step=2),
    dict(num_layers=6, num_decoder_layers=None, num_sparse_decoder_layers=2),
    dict(num_layers=2),
    dict(num_layers=4, num_sparse_encoder_layers=0),
    dict(num_layers=3, decoder_sparse_step=1, num_sparse_decoder_layers=1),
])
def test_sparse_steps_follow_the_installed_transformers(cfg):
    hf = transformers.SwitchTransformersConfig(**cfg)
    ours = ModelConfig.from_hf_dict(cfg)
    assert (ours.encoder_sparse_step, ours.decoder_sparse_step) == (hf.encoder_sparse_step, hf.decoder_sparse_step)
    assert (ours.num_layers, ours.num_decoder_layers) == (hf.num_layers, hf.num_decoder_layers)


def test_a_saved_sparse_step_overrides_num_sparse_layers_and_exports_and_validates(tmp_path):
    # The case this pins down: step 2 saved, num_sparse_encoder_layers left at its default 3 (4 // 3 = 1).
    ckpt = save_tiny(tmp_path / "ckpt", seed=3, num_layers=4, num_decoder_layers=2,
                     num_sparse_encoder_layers=3, encoder_sparse_step=2)
    raw = json.loads((ckpt / "config.json").read_text())
    assert raw["encoder_sparse_step"] == 2 and raw["num_sparse_encoder_layers"] == 3
    art = export_checkpoint(ckpt, tmp_path / "art", quiet=True)  # validates against HF
    assert _sparse(art, "encoder") == [1, 3]
    assert load_manifest(art).validation["passed"]


def test_num_sparse_layers_without_a_saved_step_give_the_derived_step(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=4, num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=2)
    raw = json.loads((ckpt / "config.json").read_text())
    for key in ("encoder_sparse_step", "decoder_sparse_step"):  # as an older writer would leave it
        raw.pop(key, None)
    (ckpt / "config.json").write_text(json.dumps(raw))
    art = export_checkpoint(ckpt, tmp_path / "art", quiet=True)
    assert _sparse(art, "encoder") == [1, 3]
    assert load_manifest(art).validation["passed"]


def test_config_that_disagrees_with_the_router_tensors_names_both(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=5, num_layers=4, num_decoder_layers=2, num_sparse_encoder_layers=2)
    raw = json.loads((ckpt / "config.json").read_text())
    raw["encoder_sparse_step"] = 1  # says every encoder layer is sparse; the weights have routers in 1 and 3
    (ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        export_checkpoint(ckpt, tmp_path / "art", quiet=True, validate=False)
    msg = str(err.value)
    assert "encoder_sparse_step 1" in msg and "[0, 1, 2, 3]" in msg and "router weights in layers [1, 3]" in msg
    assert not (tmp_path / "art").exists() and not list(tmp_path.glob(".art.*"))


SLOW_EXPORT = textwrap.dedent(
    """
    import signal, sys, time
    from pathlib import Path
    from swapmoe_export import exporter

    # As from a terminal: a runner under nohup hands down an ignored SIGHUP, and a shell's
    # background job an ignored SIGINT (then Python installs no KeyboardInterrupt); the export
    # rightly leaves ignored signals alone, so the test starts from the defaults.
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    real = exporter._write_expert

    def slow(*args, **kwargs):  # a big model's export, slowed down so the test can kill it midway
        Path(sys.argv[3]).touch()
        time.sleep(2.0)  # long enough that a loaded machine still signals it mid-export
        return real(*args, **kwargs)

    exporter._write_expert = slow
    exporter.export_checkpoint(sys.argv[1], sys.argv[2], validate=False, quiet=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_mid_export_removes_the_partial_directory_and_a_later_export_succeeds(tmp_path, sig):
    ckpt = save_tiny(tmp_path / "ckpt", seed=6)
    out, ready = tmp_path / "art", tmp_path / "writing-experts"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(ckpt), str(out), str(ready)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the export never reached the experts"
        time.sleep(0.05)
    assert list(tmp_path.glob(f".art.partial-{proc.pid}"))  # mid-export: the partial directory is there
    proc.send_signal(sig)
    rc, err = proc.wait(timeout=60), proc.stderr.read()
    if sig == signal.SIGINT:  # Python's KeyboardInterrupt (the CLI says "Aborted!")
        assert rc != 0 and "KeyboardInterrupt" in err
    else:
        assert rc == 128 + sig and "Traceback" not in err
    assert not list(tmp_path.glob(".art.*")) and not out.exists()
    export_checkpoint(ckpt, out, validate=False, quiet=True)
    assert load_manifest(out, verify=True).experts


def test_stale_partials_of_dead_exports_are_removed_and_those_of_live_ones_kept(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", seed=7)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()  # a pid that no longer runs (SIGKILL, power loss)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        stale = [tmp_path / f".art.partial-{done.pid}", tmp_path / f".art.old-{done.pid}"]
        kept = [tmp_path / f".art.partial-{live.pid}", tmp_path / f".other.partial-{done.pid}"]
        for d in stale + kept:
            (d / "experts").mkdir(parents=True)
            (d / "experts" / "x.bin").write_bytes(b"\0" * 4096)
        export_checkpoint(ckpt, tmp_path / "art", validate=False, quiet=True)
        assert not any(d.exists() for d in stale)
        assert all(d.exists() for d in kept)  # a live export, and another artifact's name
        assert load_manifest(tmp_path / "art").experts
    finally:
        live.kill()
        live.wait()
