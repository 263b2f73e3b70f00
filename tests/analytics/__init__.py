"""Tests of leaktap.analytics (a package: helpers import as tests.analytics.*)."""
