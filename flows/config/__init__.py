"""Load and validate `config.yaml`, and turn it into a `RunPlan`.

Everything here is plain Python: no Prefect server is needed to test it.
A bad config raises `ConfigError` holding one line per problem; the CLI prints
those lines and exits with status 2 before anything runs.

The package's rooms, one job each:

- `errors`: `ConfigError`.
- `sections` and `schema`: the pydantic models of the file (`PipelineConfig` and its
  sections), with the checks that span keys.
- `reading`: find the file, read and parse it once (`read_config` -> `LoadedConfig`;
  `ConfigFiles` reads each file of a command once).
- `sites`: site names, sites files and site entries.
- `plan`: a loaded config plus overrides -> `RunPlan` (`make_plan`; `load_plan` reads and
  plans in one call), each site's settings and cap group.
- `argv`: one attempt's argv (placeholders) and its output folder.

This module is the package's public face: import from `flows.config`. A test that patches
a name patches it where it is looked up (e.g. `flows.config.reading.parse_config`).
"""

from __future__ import annotations

from flows.config.argv import MAX_DIR_NAME, PLACEHOLDERS, build_argv, site_dir_name, site_output_dir
from flows.config.errors import ConfigError
from flows.config.plan import (
    RunPlan,
    SiteSettings,
    group_limit_name,
    load_plan,
    make_plan,
    resolve_settings,
)
from flows.config.reading import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    ConfigFiles,
    LoadedConfig,
    find_config,
    parse_config,
    read_config,
)
from flows.config.schema import DEFAULT_NON_RETRYABLE_ERRORS, ConfigFile, PipelineConfig
from flows.config.sections import (
    DEFAULT_NOTIFY_ON,
    MAX_RETRY_COUNT,
    AsyncSettings,
    GroupConfig,
    HaltConfig,
    LearnedTimeout,
    MetricsConfig,
    NotifyConfig,
    NotifyOutcome,
    PushgatewayConfig,
    ResultChecks,
    SiteEntry,
    TaskRunnerConfig,
)
from flows.config.sites import MAX_SITE_LENGTH, check_sites, read_sites_file, site_problem

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG",
    "DEFAULT_NON_RETRYABLE_ERRORS",
    "DEFAULT_NOTIFY_ON",
    "MAX_DIR_NAME",
    "MAX_RETRY_COUNT",
    "MAX_SITE_LENGTH",
    "PLACEHOLDERS",
    "AsyncSettings",
    "ConfigError",
    "ConfigFile",
    "ConfigFiles",
    "GroupConfig",
    "HaltConfig",
    "LearnedTimeout",
    "LoadedConfig",
    "MetricsConfig",
    "NotifyConfig",
    "NotifyOutcome",
    "PipelineConfig",
    "PushgatewayConfig",
    "ResultChecks",
    "RunPlan",
    "SiteEntry",
    "SiteSettings",
    "TaskRunnerConfig",
    "build_argv",
    "check_sites",
    "find_config",
    "group_limit_name",
    "load_plan",
    "make_plan",
    "parse_config",
    "read_config",
    "read_sites_file",
    "resolve_settings",
    "site_dir_name",
    "site_output_dir",
    "site_problem",
]
