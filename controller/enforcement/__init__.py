"""Opt-in enforcement of tenants' CRM allow lists (issue 12).

kernel_policy: the policy compiled into the TC egress program's maps and the
decisions the kernel reports back through the lt_events ring.
"""
