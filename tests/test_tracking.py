"""Experiment tracking with Weights & Biases (--wandb_project): in W&B's offline mode the run folder it writes
holds every step line's numbers, every validation and the summary, equal to the run log's; without the flag
nothing of wandb is imported; without the package the flag is a one-line error."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, load_script, read_log, small_args


def wandb_records(run_file):
    """The records of a W&B run file (run-*.wandb): LevelDB's log format, 32 KiB blocks of records each with a
    7-byte header (checksum, length, type: 1 whole, 2 first, 3 middle, 4 last), after a 7-byte file header
    (b":W&B", magic 0xBEE1, version 0); each record a protobuf `Record` of wandb's."""
    from wandb.proto import wandb_internal_pb2
    data = Path(run_file).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a W&B run file this reader knows"
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def logged(records):
    """(history rows by step, summary, config) from a W&B run's records."""
    history, summary, config = {}, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                   for item in record.history.item}
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
        elif kind in ("run", "config"):  # the settings come with the run record, later updates as config
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in updates})
    return history, summary, config


def test_an_offline_wandb_run_holds_what_the_run_log_holds(shards, tmp_path):
    pytest.importorskip("wandb", reason="needs wandb (pip install wandb)")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off")
    args = small_args(*shards, tmp_path, num_iterations=6, val_every=3, wandb_project="kit-test",
                      wandb_run_name="tiny")
    done = subprocess.run([sys.executable, str(ROOT / "train_gpt2.py"), *args], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    train, val, summary = read_log(next(tmp_path.glob("train_gpt2_*.txt")))
    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    history, tracked_summary, config = logged(wandb_records(run_file))
    assert {s: round(row["train_loss"], 4) for s, row in history.items() if "train_loss" in row} == train
    assert {step: round(row["val_loss"], 4) for step, row in history.items() if "val_loss" in row} == val
    assert all({"train_time_ms", "step_avg_ms", "tokens_per_s"} <= set(row) for row in history.values()
               if "train_loss" in row)
    assert {k: tracked_summary[k] for k in summary} == summary  # the summary line, every key
    assert config["num_iterations"] == 6 and config["wandb_run_name"] == "tiny"


def test_without_the_flag_nothing_of_wandb_is_imported(shards, tmp_path):
    code = ("import sys; sys.path.insert(0, {root!r}); from sample import import_script; "
            "import_script({script!r}).main({args!r}); print('wandb' in sys.modules)")
    args = small_args(*shards, tmp_path, num_iterations=1, val_every=0)
    code = code.format(root=str(ROOT), script=str(ROOT / "train_gpt2.py"), args=args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_the_flag_without_wandb_is_one_clear_error_before_anything_is_written(shards, tmp_path, monkeypatch):
    import importlib.util
    module = load_script(ROOT / "train_gpt2.py")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(SystemExit, match=r"^error: --wandb_project=kit needs Weights & Biases: pip install "
                                         r"wandb$"):
        module.main(small_args(*shards, tmp_path / "logs", wandb_project="kit"))
    assert not (tmp_path / "logs").exists()
