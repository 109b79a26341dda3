"""Shard reading and the distributed loader: header checks, rank striding, determinism, resume position."""
import numpy as np
import pytest
import torch

from tests.helpers import ROOT, fineweb, load_script

train = load_script(ROOT / "train_gpt2.py")
CPU = torch.device("cpu")


def write(path, tokens):
    fineweb.write_shard(str(path), np.asarray(tokens, dtype=np.uint16))
    return path


def test_read_shard_round_trip(tmp_path):
    tokens = np.arange(1000) % 50257
    assert np.array_equal(train.read_shard(write(tmp_path / "a.bin", tokens)), tokens)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:100], "shorter than the 1024-byte header"),
    (lambda b: b"\x00" * 4 + b[4:], "header magic/version 0/1"),
    (lambda b: b[:4] + b"\x02\x00\x00\x00" + b[8:], "magic/version 20240520/2"),
    (lambda b: b[:-2], "header says 1000 tokens"),
    (lambda b: b + b"\x00\x00", "but the file has 3026 bytes"),
])
def test_bad_headers_name_the_file_and_the_fix(tmp_path, damage, message):
    path = write(tmp_path / "bad.bin", np.arange(1000))
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SystemExit, match=message) as err:
        train.read_shard(str(path))
    assert str(path) in str(err.value) and "data/fineweb.py" in str(err.value)


def test_loader_reads_consecutive_windows_and_crosses_shards(tmp_path):
    write(tmp_path / "t_000001.bin", np.arange(0, 100))
    write(tmp_path / "t_000002.bin", np.arange(100, 160))
    loader = train.DistributedDataLoader(str(tmp_path / "t_*.bin"), B=2, T=8, rank=0, world=1, device=CPU)
    seen = []
    for _ in range(10):
        x, y = loader.next_batch()
        assert x.shape == (2, 8) and x.dtype == torch.int64
        assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # targets are the next tokens
        seen.append(int(x[0, 0]))
    # 16-token windows (+1 target): 0..80 in shard 1, 100..132 in shard 2, then shard 1 again (a new epoch)
    assert seen == [0, 16, 32, 48, 64, 80, 100, 116, 132, 0]


def test_ranks_take_adjacent_slices_of_one_window(tmp_path):
    write(tmp_path / "t_000001.bin", np.arange(1000))
    glob = str(tmp_path / "t_*.bin")
    single = train.DistributedDataLoader(glob, B=2, T=4, rank=0, world=1, device=CPU)
    ranks = [train.DistributedDataLoader(glob, B=2, T=4, rank=r, world=2, device=CPU) for r in range(2)]
    for _ in range(5):  # one process with two micro-steps sees what two ranks see in one
        expected = [single.next_batch()[0], single.next_batch()[0]]
        got = [loader.next_batch()[0] for loader in ranks]
        assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_loader_state_resumes_the_same_stream(tmp_path):
    write(tmp_path / "t_000001.bin", np.arange(300))
    write(tmp_path / "t_000002.bin", np.arange(300, 700))
    glob = str(tmp_path / "t_*.bin")
    a = train.DistributedDataLoader(glob, B=3, T=10, rank=0, world=1, device=CPU)
    for _ in range(12):
        a.next_batch()
    b = train.DistributedDataLoader(glob, B=3, T=10, rank=0, world=1, device=CPU)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_shards_shorter_than_a_window_are_an_error(tmp_path):
    write(tmp_path / "t_000001.bin", np.arange(50))
    with pytest.raises(SystemExit, match="shorter than one micro-step window"):
        train.DistributedDataLoader(str(tmp_path / "t_*.bin"), B=4, T=16, rank=0, world=1, device=CPU)


def test_val_tokens_are_the_first_n_plus_one_across_shards(tmp_path):
    write(tmp_path / "v_000000.bin", np.arange(100))
    write(tmp_path / "v_000001.bin", np.arange(100, 200))
    assert np.array_equal(train.load_val_tokens(str(tmp_path / "v_*.bin"), 150), np.arange(151))
    with pytest.raises(SystemExit, match="hold 200 tokens, fewer than --val_tokens=200 \\+ 1"):
        train.load_val_tokens(str(tmp_path / "v_*.bin"), 200)
