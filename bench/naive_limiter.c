// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * The baseline for bench/dataplane.py: a re-statement of the naive first-frame limiter
 * (the 2020 protect-the-rabbit idea). IPv4 only; looks at the first frame of each
 * segment only; no sequence tracking, no cancel, no channel or connection close.
 * Never deployed: it exists to be measured against.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

#define BROKER_PORT 5672
/* bench/broker.py compiles it with a limit its consume/cancel storm never reaches. */
#ifndef CONSUMER_LIMIT
#define CONSUMER_LIMIT 3
#endif

struct flow {
    __u32 saddr;
    __u32 daddr;
    __u16 sport;
    __u16 dport;
};

BPF_HASH(naive_consumers, struct flow, __u32, 65536);

int naive_limiter(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_OK;
    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_TCP)
        return TC_ACT_OK;
    struct tcphdr *tcp = (void *)ip + ip->ihl * 4;
    if ((void *)(tcp + 1) > data_end || tcp->dest != bpf_htons(BROKER_PORT))
        return TC_ACT_OK;
    __u32 payload = sizeof(*eth) + ip->ihl * 4 + tcp->doff * 4;
    __u8 hdr[11];
    if (bpf_skb_load_bytes(skb, payload, hdr, sizeof(hdr)) < 0)
        return TC_ACT_OK;
    /* method frame, class basic (60), method consume (20) */
    if (hdr[0] != 1 || hdr[7] != 0 || hdr[8] != 60 || hdr[9] != 0 || hdr[10] != 20)
        return TC_ACT_OK;
    struct flow key = {.saddr = ip->saddr, .daddr = ip->daddr, .sport = tcp->source,
                       .dport = tcp->dest};
    __u32 one = 1;
    __u32 *count = naive_consumers.lookup(&key);
    if (!count) {
        naive_consumers.update(&key, &one);
        return TC_ACT_OK;
    }
    if (*count >= CONSUMER_LIMIT)
        return TC_ACT_SHOT;
    __sync_fetch_and_add(count, 1);
    return TC_ACT_OK;
}

int noop(struct __sk_buff *skb)
{
    return TC_ACT_OK;
}
