"""Shard reading and the distributed loader: header checks, BOS-aligned rows, rank striding, resuming."""
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


def documents(tokens, doc_cap=0):
    """A shard's documents, each cut to doc_cap tokens, in plain Python: each starts at an EOT, and the tokens
    before a shard's first EOT are one too."""
    docs = []
    for i, token in enumerate(tokens):
        if token == EOT or i == 0:
            docs.append([])
        docs[-1].append(int(token))
    return [doc[:doc_cap] if doc_cap else doc for doc in docs]


def expected_rows(shards, T, doc_cap=0):
    """One epoch's rows of T + 1 tokens by the BOS-aligned rule, and the tokens it drops: whole documents from
    a document start, the last cut at the row's end (its tail dropped), the next row at the next document; a
    shard's last documents that cannot fill a row are dropped too."""
    rows, dropped = [], []
    for tokens in shards:
        row = []
        for doc in documents(tokens, doc_cap):
            if len(row) + len(doc) < T + 1:
                row += doc
                continue
            fits = T + 1 - len(row)
            rows.append(row + doc[:fits])
            dropped.append(doc[fits:])
            row = []
        dropped.append(row)
    return rows, dropped


def rows_of(loader, n):
    """The next n rows the loader gives (inputs and the last target): T + 1 tokens each."""
    rows = []
    for _ in range(n):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (1, loader.T) and x.dtype == torch.int64
        assert torch.equal(y.flatten()[:-1], x.flatten()[1:])  # targets are the next tokens
        rows.append(x.flatten().tolist() + [int(y[0, -1])])
    return rows


def random_documents(rng, n_docs, longest, vocab=50000):
    """Documents of 1 to longest tokens, each an EOT and then ids that are never EOT."""
    lengths = rng.integers(1, longest + 1, n_docs)
    return np.concatenate([np.append(EOT, rng.integers(0, vocab, n - 1)) for n in lengths])


@pytest.fixture
def mixed_shards(tmp_path):
    """Five shards: documents of 1 to 40 tokens, an empty shard, one shorter than a row of 17, one that begins
    inside a document, and one of documents longer than a row."""
    rng = np.random.default_rng(0)
    shards = [random_documents(rng, 30, 40), np.zeros(0, dtype=np.int64), random_documents(rng, 2, 5),
              np.concatenate((rng.integers(0, 50000, 7), random_documents(rng, 25, 30))),
              random_documents(rng, 6, 90)]
    for i, tokens in enumerate(shards, 1):
        write(tmp_path / f"t_{i:06d}.bin", tokens)
    return str(tmp_path / "t_*.bin"), shards


@pytest.mark.parametrize("doc_cap", [0, 12, 20])
def test_rows_are_whole_documents_from_a_document_start_and_drop_only_the_tails_cut(mixed_shards, doc_cap):
    """2025-07-12_BosAlign: every row starts at a document's first token (an EOT, but for the piece a shard
    begins with), rows never span shards, and what is dropped is exactly the tail of each document cut at a
    row's end and a shard's last documents that cannot fill a row (besides doc_cap's cuts); then the first
    shard again."""
    glob, shards = mixed_shards
    rows, dropped = expected_rows(shards, 16, doc_cap)
    assert len(rows) > 20 and any(dropped) and sum(map(len, rows)) + sum(map(len, dropped)) == sum(
        len(doc) for tokens in shards for doc in documents(tokens, doc_cap))
    loader = train.DistributedDataLoader(glob, T=16, rank=0, world=1, device=CPU, doc_cap=doc_cap)
    got = rows_of(loader, len(rows) + 3)
    assert got == rows + rows[:3]  # a new epoch after the last shard
    mid_document = documents(shards[3], doc_cap)[0]
    assert all(row[0] == EOT for row in got if row[:len(mid_document)] != mid_document)
    assert sum(row[:len(mid_document)] == mid_document for row in rows) == 1  # the shard's first row only


def test_a_shard_of_documents_longer_than_a_row(tmp_path):
    """doc_cap 0 (or above T): a long document fills a row alone, cut; a short one after it starts a row."""
    tokens = [EOT, *range(1, 30), EOT, *range(30, 35), EOT, *range(35, 40), EOT, *range(40, 70)]
    write(tmp_path / "t_000001.bin", tokens)
    loader = train.DistributedDataLoader(str(tmp_path / "t_*.bin"), T=9, rank=0, world=1, device=CPU)
    assert rows_of(loader, 4) == [[EOT, *range(1, 10)], [EOT, *range(30, 35), EOT, *range(35, 38)],
                                  [EOT, *range(40, 49)], [EOT, *range(1, 10)]]


def test_one_step_is_the_same_rows_for_any_split_into_ranks_and_micro_steps(tmp_path):
    """The global batch is bit-identical: 1 process x 6 micro-steps = 2 ranks x 3 = 3 ranks x 2 = 6 ranks x 1;
    micro-step m gives rank r row m * world + r, document cuts and shard ends included."""
    rng = np.random.default_rng(1)
    write(tmp_path / "t_000001.bin", random_documents(rng, 60, 40))
    write(tmp_path / "t_000002.bin", random_documents(rng, 40, 40))
    glob = str(tmp_path / "t_*.bin")
    single = train.DistributedDataLoader(glob, T=8, rank=0, world=1, device=CPU, doc_cap=20)
    rows = rows_of(single, 6 * 40)
    assert all(row[0] == EOT for row in rows)
    for world in (2, 3, 6):
        ranks = [train.DistributedDataLoader(glob, T=8, rank=r, world=world, device=CPU, doc_cap=20)
                 for r in range(world)]
        got = [row for _ in range(6 * 40 // world) for loader in ranks for row in rows_of(loader, 1)]
        assert got == rows
        assert all(loader.state_dict() == single.state_dict() for loader in ranks)  # one position, all ranks


def test_documents_are_cut_to_doc_cap(tmp_path):
    """2025-09-03: a document's tokens beyond its first doc_cap are skipped; the row goes on with the next."""
    tokens = np.array([EOT, 1, 2, 3, 4, 5, EOT, 6, 7, EOT, 8, 9, 10, 11, 12, 13, 14, 15, EOT, 16])
    glob = str(write(tmp_path / "t_000001.bin", tokens))
    loader = train.DistributedDataLoader(glob, T=9, rank=0, world=1, device=CPU, doc_cap=4)
    x, y = loader.next_batch()
    assert x.flatten().tolist() == [EOT, 1, 2, 3, EOT, 6, 7, EOT, 8]
    assert y.flatten().tolist() == [1, 2, 3, EOT, 6, 7, EOT, 8, 9]
    uncut = train.DistributedDataLoader(glob, T=9, rank=0, world=1, device=CPU)
    assert uncut.next_batch()[0].flatten().tolist() == tokens[:9].tolist()
    assert uncut.next_batch()[0].flatten().tolist() == tokens[:9].tolist()  # [EOT, 16] left: an epoch


@pytest.mark.parametrize("world", [1, 2])
def test_a_resumed_loader_gives_the_rows_an_uninterrupted_one_does(mixed_shards, world):
    """Rows before a checkpoint + rows after resuming from it (a new loader, as a resumed run builds) = the
    rows of an uninterrupted run: none twice, none skipped; checkpoints after every step of two epochs (so
    mid-shard, at shard ends and at an epoch's end)."""
    glob, shards = mixed_shards
    rows, _ = expected_rows(shards, 16, 20)

    def loaders():
        return [train.DistributedDataLoader(glob, T=16, rank=r, world=world, device=CPU, doc_cap=20)
                for r in range(world)]

    def steps(ranks, n):
        return [row for _ in range(n) for loader in ranks for row in rows_of(loader, 1)]

    uninterrupted = steps(loaders(), 2 * len(rows) // world)
    assert uninterrupted == (rows + rows)[:len(uninterrupted)]
    steps_in_all = len(uninterrupted) // world
    for at in range(steps_in_all + 1):
        before = loaders()
        seen = steps(before, at)
        state = before[0].state_dict()
        assert state.keys() == {"shard", "doc"} and all(loader.state_dict() == state for loader in before)
        resumed = loaders()
        for loader in resumed:
            loader.load_state_dict(state)
        assert seen + steps(resumed, steps_in_all - at) == uninterrupted


def test_shards_too_short_for_one_row_are_an_error(tmp_path):
    write(tmp_path / "t_000001.bin", [EOT, 1, 2, 3, EOT, 4])
    write(tmp_path / "t_000002.bin", [EOT, *range(1, 30)])
    write(tmp_path / "t_000003.bin", [])
    glob = str(tmp_path / "t_*.bin")
    with pytest.raises(SystemExit, match=r"every shard of --train_files=.* holds fewer than 17 tokens of "
                                         r"documents \(cut to --doc_cap=8\), too few for one row of "
                                         r"--device_batch_tokens=16 \+ 1: lower --device_batch_tokens"):
        train.DistributedDataLoader(glob, T=16, rank=0, world=1, device=CPU, doc_cap=8)
    loader = train.DistributedDataLoader(glob, T=16, rank=0, world=1, device=CPU)  # uncut: shard 2 has a row
    assert loader.state_dict() == {"shard": 1, "doc": 0} and rows_of(loader, 1) == [[EOT, *range(1, 17)]]


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
