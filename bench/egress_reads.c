// SPDX-License-Identifier: GPL-2.0-or-later
/* bench/egress_reads.py: one tc program per way of reading payload bytes (see there). */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

struct buf { __u8 b[1024 + 16]; };
BPF_PERCPU_ARRAY(scratch, struct buf, 1);
/* stats: 0 runs, 1 payload linear (data_end > payload_off), 2 linear bytes of payload sum,
 * 3 paged runs, 4 sink */
BPF_PERCPU_ARRAY(stats, __u64, 8);

static __always_inline int payload_off(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    struct iphdr *ip = data + 14;
    if ((void *)(ip + 1) > end) return -1;
    if (ip->protocol != 6) return -1;
    __u32 ihl = (ip->ihl & 0xf) * 4;
    struct tcphdr *th = data + 14 + ihl;
    if ((void *)th + 20 > end || ihl < 20) return -1;
    __u32 doff = th->doff * 4;
    __u32 tot = bpf_ntohs(ip->tot_len);
    if (tot <= ihl + doff) return -1;
    return 14 + ihl + doff;
}

static __always_inline struct buf *get_scratch(void)
{
    __u32 z = 0;
    return scratch.lookup(&z);
}

static __always_inline void sink(__u64 v)
{
    __u32 k = 4;
    __u64 *s = stats.lookup(&k);
    if (s) *s += v;
}

int noop(struct __sk_buff *skb) { return TC_ACT_OK; }

int parse(struct __sk_buff *skb)
{
    int off = payload_off(skb);
    if (off < 0) return TC_ACT_OK;
    __u32 k = 0; __u64 *s = stats.lookup(&k); if (s) *s += 1;
    k = 1; s = stats.lookup(&k);
    long lin = (long)skb->data_end - (long)skb->data - off;
    if (s && lin > 0) *s += 1;
    k = 2; s = stats.lookup(&k);
    if (s && lin > 0) *s += lin;
    k = 3; s = stats.lookup(&k);
    if (s && skb->len > skb->data_end - skb->data) *s += 1;
    return TC_ACT_OK;
}

#define LB_MAP(N) \
int lb_map_##N(struct __sk_buff *skb) { \
    int off = payload_off(skb); if (off < 0) return TC_ACT_OK; \
    struct buf *b = get_scratch(); if (!b) return TC_ACT_OK; \
    if (bpf_skb_load_bytes(skb, off, b->b, N) == 0) sink(*(__u64 *)b->b); \
    return TC_ACT_OK; }
LB_MAP(8) LB_MAP(16) LB_MAP(64) LB_MAP(128) LB_MAP(256) LB_MAP(1024)

#define LB_STACK(N) \
int lb_stack_##N(struct __sk_buff *skb) { \
    int off = payload_off(skb); if (off < 0) return TC_ACT_OK; \
    __u8 b[N]; \
    if (bpf_skb_load_bytes(skb, off, b, N) == 0) sink(*(__u64 *)b); \
    return TC_ACT_OK; }
LB_STACK(8) LB_STACK(16) LB_STACK(64) LB_STACK(128) LB_STACK(256)

/* two register-sized reads: octets 0..7 and 7..10 of a header */
int lb_regs(struct __sk_buff *skb) {
    int off = payload_off(skb); if (off < 0) return TC_ACT_OK;
    __u64 lo; __u32 ids;
    if (bpf_skb_load_bytes(skb, off, &lo, 8) == 0 &&
        bpf_skb_load_bytes(skb, off + 7, &ids, 4) == 0) sink(lo + ids);
    return TC_ACT_OK; }
/* three 8-byte reads spread 40 bytes apart (a delivery's three headers, one call each) */
int lb_3x8(struct __sk_buff *skb) {
    int off = payload_off(skb); if (off < 0) return TC_ACT_OK;
    __u64 a, b, c;
    if (bpf_skb_load_bytes(skb, off, &a, 8) == 0 &&
        bpf_skb_load_bytes(skb, off + 40, &b, 8) == 0 &&
        bpf_skb_load_bytes(skb, off + 80, &c, 8) == 0) sink(a + b + c);
    return TC_ACT_OK; }
/* relative to the network header (bpf_skb_load_bytes_relative) */
int lbr_stack_64(struct __sk_buff *skb) {
    int off = payload_off(skb); if (off < 0) return TC_ACT_OK;
    __u8 b[64];
    if (bpf_skb_load_bytes_relative(skb, off - 14, b, 64, BPF_HDR_START_NET) == 0) sink(*(__u64 *)b);
    return TC_ACT_OK; }
/* pull 64 payload bytes into the linear part, then read them directly */
int pull_64(struct __sk_buff *skb) {
    int off = payload_off(skb); if (off < 0) return TC_ACT_OK;
    if (off > 200) return TC_ACT_OK;
    if (bpf_skb_pull_data(skb, off + 64) < 0) return TC_ACT_OK;
    void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
    __u64 o = off; asm volatile("%0 &= 0xff" : "+r"(o));
    __u8 *p = data + o;
    if ((void *)(p + 8) <= end) sink(*(__u64 *)p);
    return TC_ACT_OK; }
