import pytest

from tests.helpers import make_shards


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """(train glob, val glob) of small synthetic shards, vocab 256, shared by the tests of a session."""
    return make_shards(tmp_path_factory.mktemp("shards"))
