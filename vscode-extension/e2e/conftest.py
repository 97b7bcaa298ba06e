"""A screenshot of the workbench for every failed end-to-end test (in the artifacts folder)."""

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call" and report.failed and "page" in item.funcargs:
        from test_vscode import ARTIFACTS

        item.funcargs["page"].screenshot(path=ARTIFACTS / f"failed-{item.name}.png")
    return report
