"""The fast tier: unit tests that need no tracking server, no network and no subprocess (`make test-fast`)."""
