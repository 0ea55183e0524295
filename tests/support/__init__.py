"""What the tests share: processes, servers, waits, timelines, the UI page checks, the
monitoring tools, and the fake pipelines (`fakes/`)."""
