"""pytest-benchmark setup for bench/: collects each cell's best time and prints the ratios."""

import pytest

RESULTS = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[RESULTS] = {}


@pytest.fixture
def codec_results(request):
    """{(group, impl): best seconds per operation}, filled by the benchmarks as they run."""
    return request.config.stash[RESULTS]


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    results = config.stash.get(RESULTS, None)
    if not results:
        return
    import codec_cases

    tr = terminalreporter
    tr.section("codec ratios (best time per operation, us)")
    tr.write_line(codec_cases.ratio_table(results))
    tr.write_line("")
    tr.write_line(codec_cases.format_targets(codec_cases.check_targets(results)))
