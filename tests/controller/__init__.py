"""Tests of leaktap.controller (a package: helpers import as tests.controller.*)."""
