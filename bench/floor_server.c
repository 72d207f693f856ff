/* The fan-out floor: the least a server can do per delivery, one send() per subscriber per broadcast.
 *
 * bench/fanout.py compiles this with gcc at bench time (server "floor") and runs it beside fluxrt and the
 * websockets baseline, so the kernel's share of a delivery is measured in the same run, not quoted. It speaks the
 * subset of the protocol the fan-out bench uses, like bench/ws_baseline_server.py:
 *
 *   GET /health                                  -> 200
 *   GET <path> with Upgrade: websocket           -> 101 (RFC 6455 handshake)
 *   {"type":"subscribe","channel":C}             -> {"type":"ack","channel":C,"status":"subscribed"}
 *   {"type":"broadcast",...}                     -> the same text, as one unmasked frame, to every other subscriber
 *
 * It keeps one channel (the bench subscribes every client to the same one) and forwards the broadcast's text as it
 * came, so there is no JSON parsing and no encoding: per delivery it makes exactly one non-blocking send() of one
 * pre-built frame, on a level-triggered epoll that only ever watches for input. What the kernel refuses waits in a
 * per-connection buffer for EPOLLOUT (never seen in a paced run; a burst may need it).
 *
 * Build: gcc -O2 -o floor_server bench/floor_server.c -lcrypto
 * Run:   floor_server --host 127.0.0.1 --port 18081 --path /realtime
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/sha.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define INBUF 8192

typedef struct conn {
    int fd;
    int upgraded;
    int sub_index; /* position in subs[], or -1 */
    size_t in_len;
    unsigned char in[INBUF];
    unsigned char *out; /* bytes the kernel refused, in order */
    size_t out_len, out_cap;
} conn;

static conn **by_fd;
static int max_fds;
static conn **subs;
static int n_subs;
static int ep;
static const char *path = "/realtime";
static volatile sig_atomic_t stopping;

static void on_term(int sig) {
    (void)sig;
    stopping = 1;
}

static void base64(const unsigned char *src, int n, char *dst) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    int i, j = 0;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (src[i] << 16) | (src[i + 1] << 8) | src[i + 2];
        dst[j++] = t[v >> 18];
        dst[j++] = t[(v >> 12) & 63];
        dst[j++] = t[(v >> 6) & 63];
        dst[j++] = t[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = src[i] << 16;
        dst[j++] = t[v >> 18];
        dst[j++] = t[(v >> 12) & 63];
        dst[j++] = '=';
        dst[j++] = '=';
    } else if (n - i == 2) {
        uint32_t v = (src[i] << 16) | (src[i + 1] << 8);
        dst[j++] = t[v >> 18];
        dst[j++] = t[(v >> 12) & 63];
        dst[j++] = t[(v >> 6) & 63];
        dst[j++] = '=';
    }
    dst[j] = 0;
}

static void drop(conn *c) {
    if (c->sub_index >= 0) {
        conn *last = subs[--n_subs];
        subs[c->sub_index] = last;
        last->sub_index = c->sub_index;
    }
    by_fd[c->fd] = NULL;
    close(c->fd);
    free(c->out);
    free(c);
}

/* Queue behind what already waits, or send now; the remainder waits for EPOLLOUT. */
static int send_frame(conn *c, const unsigned char *data, size_t len) {
    if (c->out_len == 0) {
        ssize_t sent = send(c->fd, data, len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (sent < 0) {
            if (errno != EAGAIN)
                return -1;
            sent = 0;
        }
        if ((size_t)sent == len)
            return 0;
        data += sent;
        len -= sent;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.fd = c->fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
    if (c->out_len + len > c->out_cap) {
        c->out_cap = (c->out_len + len) * 2;
        c->out = realloc(c->out, c->out_cap);
    }
    memcpy(c->out + c->out_len, data, len);
    c->out_len += len;
    return 0;
}

static void flush_out(conn *c) {
    ssize_t sent = send(c->fd, c->out, c->out_len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (sent < 0) {
        if (errno != EAGAIN)
            drop(c);
        return;
    }
    memmove(c->out, c->out + sent, c->out_len - sent);
    c->out_len -= sent;
    if (c->out_len == 0) {
        struct epoll_event ev = {.events = EPOLLIN, .data.fd = c->fd};
        epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    }
}

static size_t frame_header(unsigned char *h, size_t len) {
    h[0] = 0x81;
    if (len < 126) {
        h[1] = (unsigned char)len;
        return 2;
    }
    if (len < 65536) {
        h[1] = 126;
        h[2] = len >> 8;
        h[3] = len & 255;
        return 4;
    }
    h[1] = 127;
    for (int i = 0; i < 8; i++)
        h[2 + i] = (len >> (56 - 8 * i)) & 255;
    return 10;
}

/* The value of "channel" in a message, copied to out (at most cap-1 bytes); 0 when absent. */
static int channel_of(const char *msg, size_t len, char *out, size_t cap) {
    const char *key = memmem(msg, len, "\"channel\":\"", 11);
    if (!key)
        return 0;
    const char *start = key + 11, *end = memchr(start, '"', msg + len - start);
    if (!end || (size_t)(end - start) >= cap)
        return 0;
    memcpy(out, start, end - start);
    out[end - start] = 0;
    return 1;
}

static int on_text(conn *c, unsigned char *msg, size_t len) {
    static unsigned char frame[INBUF + 16];
    if (memmem(msg, len, "\"type\":\"subscribe\"", 18)) {
        char channel[512], ack[700];
        if (!channel_of((char *)msg, len, channel, sizeof channel))
            return -1;
        int n = snprintf(ack, sizeof ack, "{\"type\":\"ack\",\"channel\":\"%s\",\"status\":\"subscribed\"}", channel);
        if (c->sub_index < 0) {
            c->sub_index = n_subs;
            subs[n_subs++] = c;
        }
        size_t h = frame_header(frame, n);
        memcpy(frame + h, ack, n);
        return send_frame(c, frame, h + n);
    }
    if (memmem(msg, len, "\"type\":\"broadcast\"", 18)) {
        size_t h = frame_header(frame, len);
        memcpy(frame + h, msg, len);
        /* Backwards, so a subscriber dropped on a send error (swapped with the last) is never skipped. */
        for (int i = n_subs - 1; i >= 0; i--) {
            conn *s = subs[i];
            if (s != c && send_frame(s, frame, h + len) < 0)
                drop(s);
        }
    }
    return 0;
}

/* Handle whole frames in c->in; returns -1 when the connection must go. */
static int on_frames(conn *c) {
    size_t pos = 0;
    while (c->in_len - pos >= 2) {
        unsigned char *p = c->in + pos;
        int opcode = p[0] & 15, masked = p[1] & 128;
        size_t len = p[1] & 127, hdr = 2;
        if (len == 126) {
            if (c->in_len - pos < 4)
                break;
            len = (p[2] << 8) | p[3];
            hdr = 4;
        } else if (len == 127) {
            return -1;
        }
        if (!masked)
            return -1;
        if (c->in_len - pos < hdr + 4 + len)
            break;
        unsigned char *mask = p + hdr, *data = p + hdr + 4;
        for (size_t i = 0; i < len; i++)
            data[i] ^= mask[i & 3];
        if (opcode == 8)
            return -1;
        if (opcode == 1 && on_text(c, data, len) < 0)
            return -1;
        pos += hdr + 4 + len;
    }
    memmove(c->in, c->in + pos, c->in_len - pos);
    c->in_len -= pos;
    return 0;
}

static int on_http(conn *c) {
    char *end = memmem(c->in, c->in_len, "\r\n\r\n", 4);
    if (!end)
        return c->in_len == INBUF ? -1 : 0;
    size_t head_len = (unsigned char *)end + 4 - c->in;
    char reply[512];
    int n;
    if (strncmp((char *)c->in, "GET /health ", 12) == 0) {
        n = snprintf(reply, sizeof reply, "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
        send(c->fd, reply, n, MSG_NOSIGNAL);
        return -1;
    }
    char want[600];
    snprintf(want, sizeof want, "GET %s ", path);
    const char *key = memmem(c->in, head_len, "Sec-WebSocket-Key: ", 19);
    if (strncmp((char *)c->in, want, strlen(want)) != 0 || !key)
        return -1;
    key += 19;
    const char *key_end = memmem(key, (char *)c->in + head_len - key, "\r\n", 2);
    char buf[128];
    if (!key_end || key_end - key > 64)
        return -1;
    int kn = snprintf(buf, sizeof buf, "%.*s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", (int)(key_end - key), key);
    unsigned char digest[SHA_DIGEST_LENGTH];
    SHA1((unsigned char *)buf, kn, digest);
    char accept[64];
    base64(digest, SHA_DIGEST_LENGTH, accept);
    n = snprintf(reply, sizeof reply,
                 "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Accept: %s\r\n\r\n",
                 accept);
    if (send_frame(c, (unsigned char *)reply, n) < 0)
        return -1;
    c->upgraded = 1;
    memmove(c->in, c->in + head_len, c->in_len - head_len);
    c->in_len -= head_len;
    return on_frames(c);
}

static void on_readable(conn *c) {
    ssize_t n = recv(c->fd, c->in + c->in_len, INBUF - c->in_len, 0);
    if (n <= 0) {
        if (n < 0 && errno == EAGAIN)
            return;
        drop(c);
        return;
    }
    c->in_len += n;
    if ((c->upgraded ? on_frames(c) : on_http(c)) < 0)
        drop(c);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1";
    int port = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host"))
            host = argv[i + 1];
        else if (!strcmp(argv[i], "--port"))
            port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--path"))
            path = argv[i + 1];
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    rl.rlim_cur = rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    max_fds = rl.rlim_cur > 1 << 20 ? 1 << 20 : (int)rl.rlim_cur;
    by_fd = calloc(max_fds, sizeof *by_fd);
    subs = calloc(max_fds, sizeof *subs);

    struct sigaction sa = {.sa_handler = on_term};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, host, &addr.sin_addr);
    if (bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 4096) < 0) {
        perror("listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = ls};
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    struct epoll_event events[256];
    while (!stopping) {
        int n = epoll_wait(ep, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == ls) {
                int cfd;
                while ((cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (cfd >= max_fds) {
                        close(cfd);
                        continue;
                    }
                    /* As fluxrt and websockets do. */
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    c->sub_index = -1;
                    by_fd[cfd] = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            conn *c = by_fd[fd];
            if (!c)
                continue;
            if (events[i].events & EPOLLOUT)
                flush_out(c);
            if (by_fd[fd] == c && events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                on_readable(c);
        }
    }
    return 0;
}
