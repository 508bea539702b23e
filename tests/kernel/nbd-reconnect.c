/*
 * nbd-reconnect: attaches an NBD export to /dev/nbdINDEX through the kernel's netlink interface
 * and keeps it attached across server failures (the HA takeover test's guest client).
 *
 * Usage: nbd-reconnect IPV4 PORT EXPORT INDEX TIMEOUT_S DEAD_CONN_TIMEOUT_S
 *
 * Why not `nbd-client -persist`: nbd-client 3.24 leaves the kernel's dead-connection timeout at
 * 0, so when the server dies every queued request fails with EIO at once and a file system on
 * the device aborts. Here the device is configured with
 *   - NBD_ATTR_TIMEOUT: a request unanswered this long is requeued (not failed), and
 *   - NBD_ATTR_DEAD_CONN_TIMEOUT: requests wait this long for a new connection,
 * and on the kernel's NBD_CMD_LINK_DEAD notification this program dials the same address again
 * (where the survivor serves the export after a takeover) and hands the new socket over with
 * NBD_CMD_RECONFIGURE. The NBD handshake is the fixed-newstyle NBD_OPT_EXPORT_NAME one.
 *
 * It prints "nbd-reconnect: connected" once the device is configured and "nbd-reconnect:
 * reconnected" after every reconnection, then runs until killed.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/genetlink.h>
#include <linux/nbd-netlink.h>
#include <linux/netlink.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define NBD_BLOCK_BYTES 4096
#define RETRY_DELAY_MS 100
#define NL_BUF_BYTES 8192

static const char *g_host, *g_export;
static int g_port;
static uint32_t g_seq;

static void die(const char *what)
{
    fprintf(stderr, "nbd-reconnect: %s: %s\n", what, strerror(errno));
    exit(1);
}

static int read_full(int fd, void *buf, size_t len)
{
    char *p = buf;
    while (len > 0) {
        ssize_t n = read(fd, p, len);
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int write_full(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len > 0) {
        ssize_t n = write(fd, p, len);
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static uint64_t be64(const unsigned char *b)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | b[i];
    return v;
}

static void put_be64(unsigned char *b, uint64_t v)
{
    for (int i = 7; i >= 0; i--) {
        b[i] = (unsigned char)(v & 0xff);
        v >>= 8;
    }
}

/* Dials the server and negotiates the export; returns the socket, its size and its flags. */
static int nbd_dial(uint64_t *size, uint16_t *tflags)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)g_port)};
    if (inet_pton(AF_INET, g_host, &sa.sin_addr) != 1 ||
        connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        goto fail;
    unsigned char hello[18];
    if (read_full(fd, hello, sizeof hello) < 0 || memcmp(hello, "NBDMAGIC", 8) != 0 ||
        be64(hello + 8) != 0x49484156454F5054ULL)
        goto fail;
    uint16_t hflags = (uint16_t)((hello[16] << 8) | hello[17]);
    /* FIXED_NEWSTYLE, and NO_ZEROES if offered. */
    uint32_t cflags = htonl(1u | (hflags & 2u));
    if (write_full(fd, &cflags, 4) < 0)
        goto fail;
    size_t name_len = strlen(g_export);
    unsigned char opt[16];
    put_be64(opt, 0x49484156454F5054ULL);
    uint32_t code = htonl(1), len = htonl((uint32_t)name_len);
    memcpy(opt + 8, &code, 4);
    memcpy(opt + 12, &len, 4);
    if (write_full(fd, opt, sizeof opt) < 0 || write_full(fd, g_export, name_len) < 0)
        goto fail;
    unsigned char reply[10];
    if (read_full(fd, reply, sizeof reply) < 0)
        goto fail;
    *size = be64(reply);
    *tflags = (uint16_t)((reply[8] << 8) | reply[9]);
    if (!(hflags & 2u)) {
        unsigned char zeroes[124];
        if (read_full(fd, zeroes, sizeof zeroes) < 0)
            goto fail;
    }
    return fd;
fail:
    close(fd);
    return -1;
}

struct msg {
    char buf[NL_BUF_BYTES];
    size_t len;
};

static void msg_start(struct msg *m, uint16_t type, uint8_t cmd, uint16_t flags)
{
    memset(m->buf, 0, sizeof m->buf);
    struct nlmsghdr *h = (struct nlmsghdr *)m->buf;
    h->nlmsg_type = type;
    h->nlmsg_flags = NLM_F_REQUEST | flags;
    h->nlmsg_seq = ++g_seq;
    struct genlmsghdr *g = (struct genlmsghdr *)(m->buf + NLMSG_HDRLEN);
    g->cmd = cmd;
    g->version = NBD_GENL_VERSION;
    m->len = NLMSG_HDRLEN + GENL_HDRLEN;
}

static void put_attr(struct msg *m, uint16_t type, const void *data, uint16_t len)
{
    struct nlattr *a = (struct nlattr *)(m->buf + m->len);
    a->nla_type = type;
    a->nla_len = (uint16_t)(NLA_HDRLEN + len);
    memcpy((char *)a + NLA_HDRLEN, data, len);
    m->len += NLA_ALIGN(a->nla_len);
}

static void put_u32(struct msg *m, uint16_t type, uint32_t v) { put_attr(m, type, &v, 4); }
static void put_u64(struct msg *m, uint16_t type, uint64_t v) { put_attr(m, type, &v, 8); }

static size_t nest_start(struct msg *m, uint16_t type)
{
    size_t off = m->len;
    struct nlattr *a = (struct nlattr *)(m->buf + off);
    a->nla_type = (uint16_t)(type | NLA_F_NESTED);
    m->len += NLA_HDRLEN;
    return off;
}

static void nest_end(struct msg *m, size_t off)
{
    struct nlattr *a = (struct nlattr *)(m->buf + off);
    a->nla_len = (uint16_t)(m->len - off);
}

/* Sends `m`; receives until an ACK (returns 0 or -errno), or copies the first data reply into
 * `reply` when one is wanted and no ACK was asked for. */
static int nl_call(int fd, struct msg *m, struct msg *reply)
{
    ((struct nlmsghdr *)m->buf)->nlmsg_len = (uint32_t)m->len;
    struct sockaddr_nl to = {.nl_family = AF_NETLINK};
    if (sendto(fd, m->buf, m->len, 0, (struct sockaddr *)&to, sizeof to) < 0)
        return -errno;
    for (;;) {
        char buf[NL_BUF_BYTES];
        ssize_t n = recv(fd, buf, sizeof buf, 0);
        if (n < 0)
            return -errno;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n);
             h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type == NLMSG_ERROR) {
                struct nlmsgerr *e = NLMSG_DATA(h);
                return e->error;
            }
            if (reply) {
                memcpy(reply->buf, h, h->nlmsg_len);
                reply->len = h->nlmsg_len;
                return 0;
            }
        }
    }
}

/* Walks the attributes in [start, end): calls back with each. */
#define FOR_ATTRS(a, start, len)                                                            \
    for (struct nlattr *a = (struct nlattr *)(start); (char *)a + NLA_HDRLEN <=              \
         (char *)(start) + (len) && a->nla_len >= NLA_HDRLEN;                                \
         a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len)))

/* The nbd generic netlink family id and its multicast group id. */
static void resolve_family(int fd, uint16_t *family, uint32_t *group)
{
    struct msg m, r;
    msg_start(&m, GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 0);
    ((struct genlmsghdr *)(m.buf + NLMSG_HDRLEN))->version = 1;
    put_attr(&m, CTRL_ATTR_FAMILY_NAME, NBD_GENL_FAMILY_NAME, sizeof NBD_GENL_FAMILY_NAME);
    if (nl_call(fd, &m, &r) != 0)
        die("resolve the nbd netlink family (is the nbd module loaded?)");
    *family = 0;
    *group = 0;
    char *attrs = r.buf + NLMSG_HDRLEN + GENL_HDRLEN;
    size_t len = r.len - NLMSG_HDRLEN - GENL_HDRLEN;
    FOR_ATTRS(a, attrs, len)
    {
        uint16_t type = a->nla_type & NLA_TYPE_MASK;
        char *data = (char *)a + NLA_HDRLEN;
        if (type == CTRL_ATTR_FAMILY_ID)
            memcpy(family, data, 2);
        if (type == CTRL_ATTR_MCAST_GROUPS) {
            FOR_ATTRS(g, data, a->nla_len - NLA_HDRLEN)
            {
                char *name = NULL;
                uint32_t id = 0;
                FOR_ATTRS(f, (char *)g + NLA_HDRLEN, g->nla_len - NLA_HDRLEN)
                {
                    if ((f->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GRP_NAME)
                        name = (char *)f + NLA_HDRLEN;
                    if ((f->nla_type & NLA_TYPE_MASK) == CTRL_ATTR_MCAST_GRP_ID)
                        memcpy(&id, (char *)f + NLA_HDRLEN, 4);
                }
                if (name && strcmp(name, NBD_GENL_MCAST_GROUP_NAME) == 0)
                    *group = id;
            }
        }
    }
    if (*family == 0 || *group == 0) {
        errno = ENOENT;
        die("nbd netlink family or its multicast group");
    }
}

static int nl_socket(void)
{
    int fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_GENERIC);
    if (fd < 0)
        die("netlink socket");
    struct sockaddr_nl local = {.nl_family = AF_NETLINK};
    if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0)
        die("bind netlink socket");
    return fd;
}

static void put_socket(struct msg *m, int sock)
{
    size_t socks = nest_start(m, NBD_ATTR_SOCKETS);
    size_t item = nest_start(m, NBD_SOCK_ITEM);
    put_u32(m, NBD_SOCK_FD, (uint32_t)sock);
    nest_end(m, item);
    nest_end(m, socks);
}

static void sleep_ms(long ms)
{
    struct timespec t = {.tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000L};
    nanosleep(&t, NULL);
}

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: nbd-reconnect IPV4 PORT EXPORT INDEX TIMEOUT_S DEAD_CONN_TIMEOUT_S\n");
        return 2;
    }
    g_host = argv[1];
    g_port = atoi(argv[2]);
    g_export = argv[3];
    uint32_t index = (uint32_t)atoi(argv[4]);
    uint64_t timeout_s = (uint64_t)atoll(argv[5]), dead_s = (uint64_t)atoll(argv[6]);

    int ctl = nl_socket();
    uint16_t family;
    uint32_t group;
    resolve_family(ctl, &family, &group);
    /* Listen for LINK_DEAD before connecting, so none is missed. */
    int events = nl_socket();
    if (setsockopt(events, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) < 0)
        die("join the nbd multicast group");

    uint64_t size;
    uint16_t tflags;
    int sock = nbd_dial(&size, &tflags);
    if (sock < 0)
        die("connect and negotiate with the server");
    struct msg m;
    msg_start(&m, family, NBD_CMD_CONNECT, NLM_F_ACK);
    put_u32(&m, NBD_ATTR_INDEX, index);
    put_u64(&m, NBD_ATTR_SIZE_BYTES, size);
    put_u64(&m, NBD_ATTR_BLOCK_SIZE_BYTES, NBD_BLOCK_BYTES);
    put_u64(&m, NBD_ATTR_SERVER_FLAGS, tflags);
    put_u64(&m, NBD_ATTR_TIMEOUT, timeout_s);
    put_u64(&m, NBD_ATTR_DEAD_CONN_TIMEOUT, dead_s);
    put_socket(&m, sock);
    int err = nl_call(ctl, &m, NULL);
    if (err != 0) {
        errno = -err;
        die("NBD_CMD_CONNECT");
    }
    close(sock);
    printf("nbd-reconnect: connected /dev/nbd%u (%llu bytes)\n", index, (unsigned long long)size);
    fflush(stdout);

    for (;;) {
        char buf[NL_BUF_BYTES];
        ssize_t n = recv(events, buf, sizeof buf, 0);
        if (n < 0) {
            if (errno == EINTR || errno == ENOBUFS)
                continue;
            die("receive nbd notifications");
        }
        int dead = 0;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, (size_t)n);
             h = NLMSG_NEXT(h, n)) {
            struct genlmsghdr *g = NLMSG_DATA(h);
            if (h->nlmsg_type == family && g->cmd == NBD_CMD_LINK_DEAD)
                dead = 1;
        }
        if (!dead)
            continue;
        printf("nbd-reconnect: connection lost, dialling again\n");
        fflush(stdout);
        while ((sock = nbd_dial(&size, &tflags)) < 0)
            sleep_ms(RETRY_DELAY_MS);
        msg_start(&m, family, NBD_CMD_RECONFIGURE, NLM_F_ACK);
        put_u32(&m, NBD_ATTR_INDEX, index);
        put_socket(&m, sock);
        err = nl_call(ctl, &m, NULL);
        close(sock);
        if (err != 0) {
            fprintf(stderr, "nbd-reconnect: NBD_CMD_RECONFIGURE: %s\n", strerror(-err));
            continue;
        }
        printf("nbd-reconnect: reconnected\n");
        fflush(stdout);
    }
}
