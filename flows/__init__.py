"""site-pipeline: run a per-site pipeline over many sites with Prefect 3.

The Prefect layer is `flows.site_pipeline` (the flow) and `flows.tasks` (the
task); everything else is plain Python that needs no server.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
