// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * tc_ingress.bpf.c - leaktap's ingress side on the clsact qdisc: bytes in per
 * flow (for egress/ingress ratios) and DNS answers (source port 53, UDP and
 * TCP) so the controller can map addresses to names once each answer is
 * paired with the query tc_egress saw leave (queries arriving are counted).
 *
 * No socket is assigned yet at TC ingress, so the cgroup is 0; the controller
 * joins ingress entries to egress flows by their reversed 5-tuple. Hellos
 * are not probed here: on ingress they belong to clients of local servers.
 * Never drops: always returns TC_ACT_OK.
 */
#include "lt_tc.h"

int lt_tc_ingress(struct __sk_buff *skb)
{
	tc_handle(skb, LT_DIR_INGRESS, 0, 0);
	return TC_ACT_OK;
}
