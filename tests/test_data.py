"""Shard reading and the distributed loader: header checks, rank striding, determinism, resume position."""
import numpy as np
import pytest
import torch

from tests.helpers import ROOT, fineweb, load_script

train = load_script(ROOT / "train_gpt2.py")
CPU = torch.device("cpu")
EOT = 50256


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


def test_loader_reads_consecutive_streams_and_crosses_shards(tmp_path):
    write(tmp_path / "t_000001.bin", np.arange(0, 100))
    write(tmp_path / "t_000002.bin", np.arange(100, 160))
    loader = train.DistributedDataLoader(str(tmp_path / "t_*.bin"), T=16, rank=0, world=1, device=CPU)
    seen = []
    for _ in range(12):
        x, y = loader.next_batch()
        assert x.shape == (1, 16) and x.dtype == torch.int64
        assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # targets are the next tokens
        seen.append(int(x[0, 0]))
    # one stream through both shards (no EOT here: one document each), then shard 1 again (a new epoch)
    assert seen == [0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 0, 16]
    assert int(x[0, 0]) == 16 and loader.state_dict() == {"shard": 0, "doc": 0, "offset": 32}


def test_one_step_is_the_same_tokens_for_any_split_into_ranks_and_micro_steps(tmp_path):
    """The global batch is bit-identical: 1 process x 2 micro-steps of T = 2 ranks x 1 of T, and 1 x 1 of 2T holds the
    same tokens; document cuts included."""
    tokens = np.arange(1000) % 50000
    tokens[::37] = EOT  # documents of 37 tokens, cut to 20 below
    write(tmp_path / "t_000001.bin", tokens)
    glob = str(tmp_path / "t_*.bin")
    single = train.DistributedDataLoader(glob, T=8, rank=0, world=1, device=CPU, doc_cap=20)
    ranks = [train.DistributedDataLoader(glob, T=8, rank=r, world=2, device=CPU, doc_cap=20) for r in range(2)]
    wide = train.DistributedDataLoader(glob, T=16, rank=0, world=1, device=CPU, doc_cap=20)
    for _ in range(10):
        expected = [single.next_batch(), single.next_batch()]
        got = [loader.next_batch() for loader in ranks]
        x, y = wide.next_batch()
        for (ex, ey), (gx, gy) in zip(expected, got):
            assert torch.equal(ex, gx) and torch.equal(ey, gy)
        assert torch.equal(x, torch.cat([e[0] for e in expected], 1)) and torch.equal(y, torch.cat([e[1] for e in expected], 1))


def test_documents_are_cut_to_doc_cap(tmp_path):
    """2025-09-03: a document's tokens beyond its first doc_cap are skipped; the stream goes on with the next one."""
    tokens = np.array([EOT, 1, 2, 3, 4, 5, EOT, 6, 7, EOT, 8, 9, 10, 11, 12, 13, 14, 15])
    write(tmp_path / "t_000001.bin", tokens)
    loader = train.DistributedDataLoader(str(tmp_path / "t_*.bin"), T=9, rank=0, world=1, device=CPU, doc_cap=4)
    x, y = loader.next_batch()
    assert x.flatten().tolist() == [EOT, 1, 2, 3, EOT, 6, 7, EOT, 8]
    assert y.flatten().tolist() == [1, 2, 3, EOT, 6, 7, EOT, 8, 9]
    uncut = train.DistributedDataLoader(str(tmp_path / "t_*.bin"), T=9, rank=0, world=1, device=CPU)
    assert uncut.next_batch()[0].flatten().tolist() == tokens[:9].tolist()


def test_loader_state_resumes_the_same_stream(tmp_path):
    tokens = np.arange(700) % 50000
    tokens[::23] = EOT
    write(tmp_path / "t_000001.bin", tokens[:300])
    write(tmp_path / "t_000002.bin", tokens[300:])
    glob = str(tmp_path / "t_*.bin")
    a = train.DistributedDataLoader(glob, T=30, rank=0, world=1, device=CPU, doc_cap=10)
    for _ in range(12):
        a.next_batch()
    b = train.DistributedDataLoader(glob, T=30, rank=0, world=1, device=CPU, doc_cap=10)
    b.load_state_dict(a.state_dict())
    for _ in range(20):
        assert torch.equal(a.next_batch()[0], b.next_batch()[0])


def test_shards_without_tokens_are_an_error(tmp_path):
    write(tmp_path / "t_000001.bin", np.arange(0))
    with pytest.raises(SystemExit, match="hold no tokens"):
        train.DistributedDataLoader(str(tmp_path / "t_*.bin"), T=16, rank=0, world=1, device=CPU)


def test_val_tokens_are_the_first_n_plus_one_across_shards(tmp_path):
    write(tmp_path / "v_000000.bin", np.arange(100))
    write(tmp_path / "v_000001.bin", np.arange(100, 200))
    assert np.array_equal(train.load_val_tokens(str(tmp_path / "v_*.bin"), 150), np.arange(151))
    with pytest.raises(SystemExit, match="hold 200 tokens, fewer than --val_tokens=200 \\+ 1"):
        train.load_val_tokens(str(tmp_path / "v_*.bin"), 200)
