"""Hard to misuse, in process: data that skips everything, a full disk inside torch.save, SIGTERM outside the
training steps, and the CLI's one-line errors (issue 21, items 1-4 and 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_rel_training import _Config, _Task, _trainer, _weights  # pytest puts this folder on sys.path

import fiber_train.checkpoint as ckpt_mod
from fiber_train.checkpoint import CheckpointError, list_checkpoints
from fiber_train.cli import main
from fiber_train.loop import FitResult, TrainingStopped, fit
from fiber_train.stopping import Terminated


class _EmptyBatch:
    """What a collator returns when the data policy skipped every sample of a batch."""

    def __init__(self, skipped: tuple[str, ...]) -> None:
        self.skipped = skipped

    def __len__(self) -> int:
        return 0


class _AllBadTask(_Task):
    """Every sample is skipped (a wrong image folder under ``data.on_error=skip``)."""

    def __init__(self, *args: Any, signal_at: int = -1, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls = 0
        self.signal_at = signal_at

    def collate_fn(self) -> Any:
        def collate(items: list[Any]) -> _EmptyBatch:
            self.calls += 1
            if self.calls == self.signal_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if self.calls > 2000:  # today's loop never stops: fail instead of hanging the suite
                raise AssertionError("the loop kept drawing empty batches")
            return _EmptyBatch(tuple(f"train:/data/images/{i}.jpg:images[{i}]" for i in range(len(items))))

        return collate


def test_a_run_whose_every_sample_is_skipped_stops_naming_the_source(tmp_path: Path) -> None:
    task = _AllBadTask(_Config(_trainer(max_skipped_batches=7)))
    with pytest.raises(TrainingStopped, match=r"every sample of 7 consecutive batches") as info:
        fit(task, tmp_path / "run")
    message = str(info.value)
    assert "train: 28" in message  # 7 batches x 4 samples, counted per source
    assert "/data/images/" in message and "max_skipped_batches" in message and "\n" not in message
    assert task.calls == 7


def test_sigterm_while_every_sample_is_skipped_is_honoured(tmp_path: Path) -> None:
    task = _AllBadTask(_Config(_trainer(max_skipped_batches=10_000)), signal_at=5)
    with pytest.raises(TrainingStopped, match="SIGTERM while every sample was being skipped"):
        fit(task, tmp_path / "run")
    assert task.calls == 5


def test_max_skipped_batches_is_validated() -> None:
    with pytest.raises(ValueError, match="max_skipped_batches"):
        _trainer(max_skipped_batches=0)


def test_disk_full_inside_torch_save_names_disk_full_and_the_latest_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.save
    calls = {"n": 0}

    def full_disk_save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # torch reports ENOSPC as a RuntimeError, not an OSError
            raise RuntimeError(
                "[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing file data/3: "
                "file write failed"
            )
        real(obj, f, *a, **kw)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk_save)
    with pytest.raises(CheckpointError) as info:
        fit(_Task(_Config(_trainer())), tmp_path / "run")
    message = str(info.value)
    assert "step_00000003 (disk full)" in message
    assert message.rstrip().endswith("lower trainer.keep_checkpoints")
    assert f"still {tmp_path / 'run' / 'checkpoints' / 'step_00000002'}" in message
    assert "\n" not in message and "inline_container" not in message
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_00000001", "step_00000002"]  # no partial leftovers


def test_disk_full_is_recognised_from_the_error_text_or_a_full_filesystem(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ckpt_mod._disk_full(RuntimeError("Error while serializing: IoError(Os { kind: StorageFull })"), tmp_path)
    assert not ckpt_mod._disk_full(RuntimeError("some other failure"), tmp_path)
    monkeypatch.setattr(ckpt_mod.shutil, "disk_usage", lambda p: _Usage())
    assert ckpt_mod._disk_full(RuntimeError("some other failure"), tmp_path)


class _Usage:
    total, used, free = 100, 100, 0


class _SignalIn(_Task):
    def __init__(self, *args: Any, where: str, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.where = where

    def prepare_data(self) -> None:
        if self.where == "prepare":
            os.kill(os.getpid(), signal.SIGTERM)

    def export(self, model: torch.nn.Module, out_dir: Any) -> None:
        super().export(model, out_dir)
        if self.where == "export":
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_during_start_up_says_nothing_was_saved(tmp_path: Path) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated, match=r"SIGTERM during start-up of .*run: no checkpoint was saved"):
        fit(_SignalIn(_Config(_trainer()), where="prepare"), tmp_path / "run")
    assert signal.getsignal(signal.SIGTERM) == handler


def test_sigterm_during_the_final_export_names_the_checkpoint_and_resume(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(Terminated) as info:
        fit(_SignalIn(_Config(_trainer(ckpt_every=0)), where="export"), run)
    message = str(info.value)
    assert "final checkpoint, export and evaluation" in message
    assert f"{run / 'checkpoints' / 'step_00000004'}" in message and f"--resume {run}" in message
    assert not (run / "model").exists()  # the atomic export was abandoned
    result = fit(_Task(_Config(_trainer(ckpt_every=0))), run)  # resuming finishes the export
    assert result.step == 4 and (run / "model" / "model.safetensors").is_file()
    assert _weights(run / "checkpoints" / "step_00000004").keys() == _weights(run / "model").keys()


def test_sigterm_mid_training_advises_resume_with_the_run_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class _Term(_Task):
        def build_model(self) -> torch.nn.Module:
            model = super().build_model()
            forward = model.forward

            def forward_then_signal(batch: Any) -> Any:
                if model.calls == 1:
                    os.kill(os.getpid(), signal.SIGTERM)
                return forward(batch)

            model.forward = forward_then_signal
            return model

    run = tmp_path / "run"
    result = fit(_Term(_Config(_trainer(ckpt_every=0))), run)
    assert result.preempted
    assert f"plus `--resume {run}`" in caplog.text  # a logged warning
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step_00000002"]


def test_cli_summary_of_a_preempted_finetune_run_gives_its_resume_command(capsys: pytest.CaptureFixture) -> None:
    from fiber_train.cli import _print_summary

    _print_summary("vqa", FitResult(run_dir=Path("runs/vqa-1"), step=3, preempted=True))
    out = capsys.readouterr().out
    assert "`fiber-train finetune vqa --resume runs/vqa-1`" in out
    assert "same command" not in out


def test_cli_sigterm_during_start_up_prints_a_message(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import fiber_train.cli as cli

    def resolve(*a: Any) -> Any:
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("unreachable")

    monkeypatch.setattr(cli, "_resolve_config", resolve)
    assert main(["coarse"]) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fiber-train: SIGTERM during start-up: nothing was saved; run the command again"]


# ------------------------------------------------------------------------------------- "next:" and --help


@pytest.mark.parametrize(
    ("task", "expected", "wrong"),
    [
        ("coarse", "--task scoring", "fiber-train fine --"),
        ("fine", "--task grounding", "fiber-train coarse"),
        ("detection", "fiber-train finetune detection --set", "fiber-train coarse"),
        ("vqa", "--task vqa", "fiber-train coarse"),
        ("nlvr2", "fiber-train finetune nlvr2 --set", "fiber-train predict"),
    ],
)
def test_next_footer_fits_the_task(task: str, expected: str, wrong: str) -> None:
    from fiber_train.cli import _command_of, _next_steps

    text = "\n".join(_next_steps(task, _command_of(task), Path("runs/r")))
    assert expected in text and wrong not in text
    assert "fiber-train evaluate --run runs/r" in text


def test_top_level_help_lists_fine_and_convert_help_works(capsys: pytest.CaptureFixture) -> None:
    from fiber_train.cli import build_parser

    help_text = build_parser().format_help()
    assert "\n  fine " in help_text and "--debug" in help_text
    with pytest.raises(SystemExit) as info:
        main(["convert", "--help"])
    assert info.value.code == 0
    assert "usage: fiber-train convert" in capsys.readouterr().out


_NO_TORCH = "print(sorted(m for m in ('torch', 'torchvision', 'numpy') if m in sys.modules))"


@pytest.mark.parametrize(
    "code",
    [
        "import sys, io, contextlib, fiber_train.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()) as o: rc = c.main(['coarse', '--print-config'])\n"
        "assert rc == 0 and 'trainer:' in o.getvalue()\n",
        "import sys, io, contextlib, fiber_data.cli as c\n"
        "with contextlib.redirect_stdout(io.StringIO()) as o:\n"
        "    try: c.main(['--help'])\n"
        "    except SystemExit: pass\n"
        "assert 'verify' in o.getvalue()\n",
    ],
    ids=["print-config", "fiber-data-help"],
)
def test_print_config_and_fiber_data_help_import_no_torch(code: str) -> None:
    out = subprocess.run([sys.executable, "-c", code + _NO_TORCH], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


# ------------------------------------------------------------------- one-line errors of the command line

_TINY = [
    "data.batch_size=8",
    "data.max_text_len=16",
    "model.hidden_dim=32",
    "model.itc_dim=32",
    "trainer.max_steps=2",
    "trainer.progress=false",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a synthetic COCO-captions folder without world.json, a finished 2-step coarse run on it)."""
    from fiber_data import SyntheticWorldConfig, generate_world

    work = tmp_path_factory.mktemp("misuse")
    root = work / "w"
    generate_world(root, SyntheticWorldConfig(num_train=16, num_val=2, num_test=4), progress=False)
    (root / "world.json").unlink()
    assert main(["coarse", "--data", str(root), "--out", str(work / "runs"), "--run-name", "r", "--set", *_TINY]) == 0
    return root, work / "runs" / "r"


def _one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fiber-train:")]
    assert len(err) == 1, err
    assert "Traceback" not in err[0] and "\x1b" not in err[0]
    return err[0]


def test_model_pretrained_given_a_pickle_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    root, _ = tiny_run
    import pickle

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"x": Evil()}))
    argv = ["coarse", "--data", str(root), "--out", str(tmp_path / "runs"), "--set", *_TINY, f"model.pretrained={evil}"]
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert str(evil) in line and "never pickles" in line and "fiber-train convert" in line
    assert not marker.exists()


def test_binary_garbage_in_meta_json_names_the_file(tiny_run, tmp_path: Path, capsys) -> None:
    import shutil

    _, run = tiny_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    meta = copy / "checkpoints" / "step_00000002" / "meta.json"
    meta.write_bytes(bytes(range(128, 256)) * 3)
    assert main(["coarse", "--resume", str(copy), "--set", "trainer.max_steps=3"]) == 2
    line = _one_error_line(capsys)
    assert f"{meta}: corrupt (UnicodeDecodeError" in line and "delete the directory" in line


def test_evaluate_on_other_data_uses_the_runs_tokenizer(tiny_run, tmp_path: Path, capsys) -> None:
    import shutil

    root, run = tiny_run
    other = tmp_path / "other"  # the same test split in another folder, without a tokenizer
    shutil.copytree(root / "annotations", other / "annotations")
    shutil.copytree(root / "images" / "test", other / "images" / "test")
    assert not (other / "tokenizer.json").exists()
    assert main(["evaluate", "--run", str(run), "--set", f"data.root={other}"]) == 0
    assert '"t2i/R@1"' in capsys.readouterr().out


def test_hub_tokenizer_offline_says_what_to_do(tiny_run, tmp_path: Path, monkeypatch, capsys) -> None:
    root, _ = tiny_run
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = ["coarse", "--data", str(root), "--out", str(tmp_path / "runs"), "--set", *_TINY]
    assert main([*argv, "data.tokenizer=no-such-org/no-such-tokenizer"]) == 2
    line = _one_error_line(capsys)
    assert "cannot load tokenizer 'no-such-org/no-such-tokenizer'" in line and "offline" in line
    assert "data.tokenizer" in line


def test_missing_tokenizer_hint_is_about_the_tokenizer(tiny_run, tmp_path: Path, capsys) -> None:
    import shutil

    root, _ = tiny_run
    copy = tmp_path / "w"
    shutil.copytree(root, copy)
    (copy / "tokenizer.json").unlink()
    assert main(["coarse", "--data", str(copy), "--out", str(tmp_path / "runs"), "--set", *_TINY]) == 2
    line = _one_error_line(capsys)
    assert f"{copy / 'tokenizer.json'}: tokenizer not found" in line
    assert "fiber-data train-tokenizer" in line and "captions_" not in line


def test_convert_refusals_are_one_line_without_ansi_codes(tmp_path: Path, capsys) -> None:
    import pickle

    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": {"a": os.path.join}}))  # needs a global: refused, never run
    assert main(["convert", str(evil), str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert "refusing to load" in line and str(evil) in line
    assert "will likely succeed" not in line  # torch's advice to load it unsafely is not passed on
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    assert main(["convert", str(truncated), str(tmp_path / "out")]) == 2
    assert "truncated or corrupt" in _one_error_line(capsys)
    assert main(["convert", str(tmp_path / "missing.ckpt"), str(tmp_path / "out")]) == 2
    assert "no checkpoint file" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_one_line_strips_ansi_codes_and_newlines() -> None:
    from fiber_train.cli import one_line

    assert one_line(ValueError("a \x1b[1mbold\x1b[0m\n  word")) == "a bold word"


def test_fiber_debug_env_shows_the_traceback(tmp_path: Path, monkeypatch) -> None:
    from fiber_backbones.convert import CheckpointFormatError

    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(b"\x10\x00\x00")
    monkeypatch.setenv("FIBER_DEBUG", "1")
    with pytest.raises(CheckpointFormatError):
        main(["convert", str(bad), str(tmp_path / "out")])


def test_a_stream_that_yields_nothing_stops_with_a_message(tmp_path: Path) -> None:
    from torch.utils.data import IterableDataset

    class _Empty(IterableDataset):  # a stream whose every sample was dropped by the skip policy
        def __iter__(self) -> Any:
            return iter(())

    class _StreamTask(_Task):
        def train_dataset(self) -> Any:
            return _Empty()

    with pytest.raises(TrainingStopped, match=r"yielded no batch in a whole pass \(epoch 1\)"):
        fit(_StreamTask(_Config(_trainer())), tmp_path / "run")
