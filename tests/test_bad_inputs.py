"""Bad inputs to the train scripts, fed to the real command: paths, values, state, full disks and signals. Each
ends in one `error:` line that names the flag or file and the fix, before anything is written; what a run
already wrote is closed with its summary, and nothing is left half-written."""
import dataclasses
import os
import resource
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.helpers import (ROOT, SCRIPTS, fineweb, load_script, make_shards, read_log, small_args,
                           without_file_permission_bypass)

BASELINE = ROOT / "train_gpt2.py"


def error_of(module, flags):
    """The SystemExit message of module.main(flags)."""
    with pytest.raises(SystemExit) as exit_info:
        module.main(flags)
    return str(exit_info.value.code)


def run_script(args, script=BASELINE, preexec_fn=None, timeout=300, cmd=None):
    """The real command in a subprocess: (return code, stdout, stderr)."""
    cmd = cmd or [sys.executable, str(script), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, preexec_fn=preexec_fn,
                            cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return result.returncode, result.stdout, result.stderr


def one_error_line(stderr):
    """stderr's only line, which is an error (no traceback, no second message)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    return lines[0]


# ---- paths ----
def test_shard_globs_that_match_a_folder_a_dangling_symlink_or_nothing(shards, tmp_path):
    module = load_script(BASELINE)
    train, val = shards
    logs = tmp_path / "logs"
    (tmp_path / "dir.bin").mkdir()
    os.symlink(tmp_path / "gone.bin", tmp_path / "link_train_000001.bin")
    cases = [
        (f"--train_files={tmp_path}", f"--train_files={tmp_path}: {tmp_path} is a folder; give a glob of the "
                                      f"shards in it, e.g. --train_files={tmp_path}/*.bin"),
        (f"--val_files={tmp_path}/dir.bin", f"--val_files={tmp_path}/dir.bin: {tmp_path}/dir.bin is a folder"),
        ("--train_files=", "--train_files= is empty: give a glob of token shards, e.g. --train_files=data/"),
        (f"--train_files={tmp_path}/link_*.bin", f"link_train_000001.bin is a dangling symlink (to "
                                                 f"{tmp_path}/gone.bin)"),
    ]
    for flag, message in cases:
        flags = small_args(train, val, logs) + [flag]
        assert message in error_of(module, flags), flag
    assert not logs.exists()


def test_an_unreadable_shard_or_checkpoint_is_named(shards, tmp_path):
    """File modes, as a user without root's bypass meets them (tests/helpers.py)."""
    train, val = shards
    secret = tmp_path / "secret_train_000001.bin"
    secret.write_bytes(open(train.replace("*", "000001"), "rb").read())
    secret.chmod(0)
    code, _, err = run_script([], cmd=without_file_permission_bypass(
        [sys.executable, str(BASELINE), *small_args(str(secret), val, tmp_path / "logs")]))
    assert code == 1 and f"{secret} cannot be read (Permission denied)" in one_error_line(err)
    ckpt = tmp_path / "ckpt_step000002.pt"
    ckpt.write_bytes(b"x" * 100)
    ckpt.chmod(0)
    code, _, err = run_script([], cmd=without_file_permission_bypass(
        [sys.executable, str(BASELINE), f"--resume={ckpt}"]))
    assert code == 1 and f"--resume={ckpt} cannot be read (Permission denied)" in one_error_line(err)
    assert not (tmp_path / "logs").exists()


def test_resume_from_a_dangling_symlink_or_a_folder(tmp_path):
    module = load_script(BASELINE)
    os.symlink(tmp_path / "gone.pt", tmp_path / "last.pt")
    assert f"--resume={tmp_path}/last.pt is a dangling symlink (to {tmp_path}/gone.pt)" in error_of(
        module, [f"--resume={tmp_path}/last.pt"])
    assert f"--resume={tmp_path} is a folder; pass a checkpoint file" in error_of(module, [f"--resume={tmp_path}"])


def test_log_dir_that_is_a_file_empty_or_impossible_is_refused_before_the_model_is_built(shards, tmp_path,
                                                                                        monkeypatch):
    module = load_script(BASELINE)
    monkeypatch.setattr(module, "build_model", lambda run: pytest.fail("built the model before checking"))
    (tmp_path / "a_file").write_text("")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for log_dir, problem in [(tmp_path / "a_file", "is a file"),
                             (tmp_path / "a_file" / "logs", f"cannot be made: {tmp_path}/a_file is a file"),
                             ("", "is empty"), ("/proc/x/logs", "cannot be made in /proc"),
                             (tmp_path / "dangling", "dangling symlink")]:
        message = error_of(module, small_args(*shards, log_dir))
        assert message.startswith(f"error: --log_dir={log_dir} ") and problem in message, message
        assert "give a folder this process can write to" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "dangling"]


def test_an_unwritable_log_dir_is_refused(shards, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    for log_dir, problem in [(locked, "cannot be written (Permission denied)"),
                             (locked / "logs", f"cannot be made in {locked} (Permission denied)")]:
        code, out, err = run_script([], cmd=without_file_permission_bypass(
            [sys.executable, str(BASELINE), *small_args(*shards, log_dir)]))
        assert code == 1 and f"--log_dir={log_dir} {problem}" in one_error_line(err) and out == ""
    assert list(locked.iterdir()) == []


# ---- values ----
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_number_flag_refuses_nan_and_inf_and_every_idea_flag_a_negative(script):
    """Generated from the flags themselves, so a new flag is covered the day it is declared."""
    module = load_script(script)
    idea = {f.name for f in dataclasses.fields(module.IdeaFlags)}
    for field in dataclasses.fields(module.Hyperparameters):
        if field.type not in (int, float):
            continue
        for value in ["nan", "inf", "-inf"] + (["-1"] if field.name in idea else []):
            with pytest.raises(SystemExit) as exit_info:
                module.parse_args([f"--{field.name}={value}"])
            assert str(exit_info.value.code).startswith(f"error: --{field.name}={value}"), exit_info.value.code


def test_mtp_weight_below_zero_is_refused():
    module = load_script(ROOT / "train_gpt2_mtp.py")
    assert "--mtp_weight=-1.0: expected a number >= 0 (a negative weight would maximise the MTP loss)" in \
        error_of(module, ["--mtp_weight=-1"])


def test_value_embeds_beyond_the_depth_is_an_error_when_given_and_a_stated_clamp_when_not(shards, tmp_path):
    module = load_script(BASELINE)
    message = error_of(module, small_args(*shards, tmp_path / "a", value_embeds=3))  # n_layer=2: 2 attend
    assert "error: --value_embeds=3: at most 2 for --n_layer=2 (one table per attention layer)" in message
    assert not (tmp_path / "a").exists()
    summary = module.main(small_args(*shards, tmp_path / "b", num_iterations=1, val_tokens=0))
    log = (tmp_path / "b" / f"{summary['run_id']}.txt").read_text()
    default = module.Hyperparameters.value_embeds
    assert default > 2 and f"# value_embeds {default} -> 2: --n_layer=2 has room for 2" in log
    assert '"value_embeds": 2' in log


def test_n_embd_without_a_head_count_that_works_says_to_change_n_embd(shards, tmp_path):
    message = error_of(load_script(BASELINE), small_args(*shards, tmp_path, n_embd=770))
    assert message == ("error: --n_embd=770: expected a multiple of 4 (heads of a multiple of 4 channels, for "
                       "rotary), e.g. --n_embd=768")


def test_the_start_up_line_says_what_kernels_run(shards, tmp_path):
    module = load_script(BASELINE)
    for flag, expected in [("0", "kernels off  "), ("1", "kernels triton (interpreter)  " if module.kernels.HAS_TRITON
                                                      and module.kernels._dispatch.INTERPRET else "kernels off (")]:
        summary = module.main(small_args(*shards, tmp_path / flag, num_iterations=1, val_tokens=0, kernels=flag))
        assert expected in (tmp_path / flag / f"{summary['run_id']}.txt").read_text()


def test_resume_with_a_preset_applies_it_over_the_checkpoint_then_the_flags(shards, tmp_path):
    module = load_script(BASELINE)
    first = module.main(small_args(*shards, tmp_path / "a", num_iterations=4, save_every=2, val_tokens=0))
    ckpt = first["last_checkpoint"]
    # the preset's 2290 steps would win over the checkpoint's 4: the flag given wins over both
    summary = module.main([f"--resume={ckpt}", "--preset=modded", "--val_tokens=2048", "--num_iterations=4",
                           f"--log_dir={tmp_path}/b"])
    log = (tmp_path / "b" / f"{summary['run_id']}.txt").read_text()
    assert "# --preset=modded applied over the checkpoint's settings, then the flags given" in log
    assert summary["target_val_loss"] == 3.28 and summary["val_tokens"] == 2048  # the preset's, then the flag's
    assert summary["steps"] == 4 and '"n_embd": 64' in log  # the rest is the checkpoint's


# ---- state: divergence, the last good checkpoint, shards checked up front ----
# no weight decay: with it, LRs of 1e6 blow the weights up to inf (the decay grows with the LR squared), a NaN
DIVERGING = dict(muon_lr=1e6, adam_lr=1e6, muon_weight_decay=0, adam_weight_decay=0, diverge_steps=4,
                 num_iterations=40, val_every=0)


def test_a_blown_up_loss_that_stays_finite_stops_the_run_naming_the_flags_to_lower(shards, tmp_path):
    """With LRs of 1e6 the logit cap keeps the loss finite, far above uniform (ln 256): it stops after
    diverge_steps such steps, exit 1, with no good checkpoint to name."""
    code, out, err = run_script(small_args(*shards, tmp_path, **DIVERGING))
    line = one_error_line(err)
    assert code == 1 and line.startswith("error: stopped: train_loss diverged at step "), line
    assert "no good checkpoint was saved: start again with lower --muon_lr=1e+06 (default 0.023), " \
           "--adam_lr=1e+06 (default 0.008)" in line and "resume from" not in line
    train, _, summary = read_log(next(tmp_path.glob("*.txt")))
    assert summary["steps"] < 20 and summary["last_checkpoint"] is None and line in out


def test_after_a_resume_a_divergence_names_the_checkpoint_resumed_from(shards, tmp_path):
    module = load_script(BASELINE)
    first = module.main(small_args(*shards, tmp_path / "a", num_iterations=2, save_every=2, val_tokens=0))
    ckpt = first["last_checkpoint"]
    assert ckpt.endswith("ckpt_step000002.pt")
    flags = [f"--resume={ckpt}", f"--log_dir={tmp_path}/b"] + [f"--{k}={v}" for k, v in DIVERGING.items()]
    message = error_of(module, flags)
    assert f"; resume from {ckpt} with lower --muon_lr=1e+06" in message, message
    assert read_log(next((tmp_path / "b").glob("*.txt")))[2]["last_checkpoint"] == ckpt


def test_a_bad_token_id_in_a_later_shard_is_found_before_anything_is_written(tmp_path):
    train, val = make_shards(tmp_path / "data", shards=3)
    bad = np.zeros(1000, dtype=np.uint16)
    bad[500] = 300  # >= the vocabulary of 256
    os.remove(train.replace("*", "000003"))
    fineweb.write_shard(train.replace("*", "000003"), bad)
    message = error_of(load_script(BASELINE), small_args(train, val, tmp_path / "logs"))
    assert "syn_train_000003.bin: token id 300 >= --vocab_size=256" in message
    assert not (tmp_path / "logs").exists()


# ---- a full disk ----
def file_size_limit(n_bytes):
    """preexec_fn: writes past n_bytes fail with EFBIG, as on a full disk (Python ignores SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))


def test_a_disk_full_while_saving_a_checkpoint_stops_with_one_line_and_the_summary(shards, tmp_path):
    """A 400 KB limit: the log (~130 KB) fits, a checkpoint (~1.4 MB) does not."""
    code, out, err = run_script(small_args(*shards, tmp_path, num_iterations=6, save_every=3),
                                preexec_fn=file_size_limit(400_000))
    line = one_error_line(err)
    assert code == 1 and line.startswith("error: stopped: writing ") and "ckpt_step000003.pt failed (" in line
    assert " MB free there) at step 3; last checkpoint: None" in line
    summary = read_log(next(tmp_path.glob("*.txt")))[2]
    assert summary["steps"] == 3 and summary["stopped"].startswith("writing ")
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == [f"{summary['run_id']}.txt"]  # no half file


def test_a_log_that_cannot_be_written_at_start_up_is_removed(shards, tmp_path):
    code, out, err = run_script(small_args(*shards, tmp_path / "logs"), preexec_fn=file_size_limit(20_000))
    line = one_error_line(err)
    assert code == 1 and line.startswith(f"error: writing {tmp_path}/logs/train_gpt2_") and \
        line.endswith("(File too large); nothing was kept: free some space or give another --log_dir")
    assert not (tmp_path / "logs").exists()


def test_a_log_that_fills_the_disk_mid_run_stops_it_with_the_summary_printed(shards, tmp_path, monkeypatch):
    module = load_script(BASELINE)
    real_write = module.RunLog.write

    def write(self, text, echo=True):  # the file refuses step 3's line and everything after
        if text.startswith("step:3/") and self.file is not None:
            self.file.close()
            self.file = open(os.devnull, "w")
            self.file.write = lambda _: (_ for _ in ()).throw(OSError(28, "No space left on device"))
        return real_write(self, text, echo)

    monkeypatch.setattr(module.RunLog, "write", write)
    message = error_of(module, small_args(*shards, tmp_path, num_iterations=8, val_every=0))
    assert message.startswith("error: stopped: writing ") and \
        "failed (No space left on device) at step 4; last checkpoint: None" in message, message
    log = next(tmp_path.glob("*.txt")).read_text()
    assert "step:2/8" in log and "step:3/8" not in log


# ---- signals ----
DRIVER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from sample import import_script
    module = import_script({script!r})
    real = getattr(module, {where!r})

    def signal_then_go_on(*args, **kwargs):  # the signal lands inside this start-up step
        os.kill(os.getpid(), signal.{sig})
        return real(*args, **kwargs)

    setattr(module, {where!r}, signal_then_go_on)
    sys.exit(module.main(sys.argv[1:]))
""")


def run_signalled(where, sig, args):
    driver = DRIVER.format(root=str(ROOT), script=str(BASELINE), where=where, sig=sig.name)
    return run_script([], cmd=[sys.executable, "-c", driver, *args])


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize("where", ["check_inputs", "build_model", "environment_report"])
def test_a_signal_during_start_up_leaves_nothing(shards, tmp_path, where, sig, code):
    """environment_report runs inside open_log, once the log file exists: the half log is removed."""
    rc, out, err = run_signalled(where, sig, small_args(*shards, tmp_path / "logs"))
    assert rc == code and one_error_line(err) == \
        f"error: interrupted ({sig.name}) during start-up; nothing was written"
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_the_compile_warm_up_writes_the_interrupted_line_and_the_summary(shards, tmp_path, sig,
                                                                                        code):
    rc, out, err = run_signalled("compile_warmup", sig, small_args(*shards, tmp_path, compile=1))
    assert rc == code and "Traceback" not in err, err[-3000:]
    log = next(tmp_path.glob("*.txt")).read_text()
    assert f"\ninterrupted ({sig.name}) in the compile warm-up; last checkpoint: None\n" in log
    summary = read_log(next(tmp_path.glob("*.txt")))[2]
    assert summary["stopped"] == f"interrupted ({sig.name}) in the compile warm-up" and summary["steps"] == 0
