import pytest

from tests.helpers import make_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """(train glob, val glob) of small synthetic shards, vocab 256, shared by the tests of a session. 256 ids
    hold no <|endoftext|>, so to the loader each shard is one document, which gives one row (rows start at a
    document and never span shards): 60 train shards of 1,000 tokens are 60 rows an epoch, not 2."""
    return make_shards(tmp_path_factory.mktemp("shards"), shards=60)
