"""The product tests' setup (hub offline, one intra-op thread, a fixed seed per test) for the research tools' tests."""

from tests.conftest import _seed  # noqa: F401 - importing it applies the setup and brings the autouse fixture
