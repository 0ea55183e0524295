"""Which of Prefect's run log records keep their traceback (flows.engine.logfilter)."""

from __future__ import annotations

import logging
import sys

import httpx
import pytest
from prefect.exceptions import PrefectHTTPStatusError

from flows.engine.failure import SiteAttemptFailed
from flows.engine.logfilter import install_traceback_filter
from flows.report import SiteReport


def _record(logger: str, error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord(logger, logging.ERROR, __file__, 1, "failed", None, exc_info)


def _api_error() -> PrefectHTTPStatusError:
    request = httpx.Request("POST", "http://127.0.0.1:4200/api/flow_runs/x/set_state")
    response = httpx.Response(500, request=request)
    return PrefectHTTPStatusError.from_httpx_error(
        httpx.HTTPStatusError("500", request=request, response=response)
    )


@pytest.mark.parametrize("logger", ["prefect.task_runs", "prefect.flow_runs"])
def test_site_failures_and_api_failures_lose_their_traceback_and_bugs_keep_it(
    logger: str,
) -> None:
    """On both of Prefect's run loggers: a site's failure, a failed API call (a 500, or no
    connection) keep their one line without a traceback; any other exception (a bug in this
    tool) keeps its traceback. Installing twice adds one filter."""
    install_traceback_filter()
    install_traceback_filter()
    run_logger = logging.getLogger(logger)
    assert [type(f).__name__ for f in run_logger.filters].count("_NoTracebackForSiteFailures") == 1
    site = SiteAttemptFailed(SiteReport("a", "failed", 1, 1, 0.1, "exit code 1"), False)
    refused = httpx.ConnectError("refused", request=httpx.Request("GET", "http://x.invalid/"))
    for quiet in (site, _api_error(), refused):
        record = _record(logger, quiet)
        assert run_logger.filter(record)
        assert record.exc_info is None, type(quiet).__name__
    bug = _record(logger, ValueError("a bug"))
    assert run_logger.filter(bug)
    assert bug.exc_info is not None
