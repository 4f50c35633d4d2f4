/*
 * nsm-pcr: print PCRs read from the Nitro Secure Module, for images without python.
 *
 * Usage: nsm-pcr INDEX...
 *
 * For each index it sends the NSM request {"DescribePCR": {"index": N}} through /dev/nsm and
 * prints one line of JSON, the same shape as `nsm_tool.py describe-pcr N` (images/guest):
 *
 *   {"index": 0, "lock": true, "data": "<lower-case hex>"}
 *
 * An {"Error": "<text>"} response or any other failure prints one line "nsm-pcr: <what
 * failed>" on stderr and exits 1 (indexes after it are not read).
 *
 * /dev/nsm is the upstream Linux driver (drivers/misc/nsm.c, include/uapi/linux/nsm.h): one
 * ioctl carries a raw CBOR request and returns the raw CBOR response. Requests and responses
 * are serde_cbor's encoding of aws-nitro-enclaves-nsm-api's Request/Response enums; the
 * decoder below accepts exactly what it needs (definite lengths only) and checks every length
 * against the bytes the driver returned. Built static (images/nsm-pcr/Makefile): the hello
 * image has no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/types.h>

/* Overridable so the decoder can be tested on a host without an NSM (tests/unit/test_nsm_pcr.py). */
#ifndef NSM_DEVICE
#define NSM_DEVICE "/dev/nsm"
#endif

/* include/uapi/linux/nsm.h (Linux 6.8+); Debian 12's linux-libc-dev predates it. The layout
 * and number equal AWS's out-of-tree driver's NSM_IOCTL_REQUEST on x86_64. */
struct nsm_iovec {
    __u64 addr;
    __u64 len;
};

struct nsm_raw {
    struct nsm_iovec request;
    struct nsm_iovec response;
};

#define NSM_MAGIC 0x0A
#define NSM_IOCTL_RAW _IOWR(NSM_MAGIC, 0x0, struct nsm_raw)
#define NSM_RESPONSE_MAX_SIZE 0x3000

/* PCR indexes are u16 in the NSM API; a PCR is at most SHA-512 (64 bytes) long. */
#define PCR_INDEX_MAX 0xFFFF
#define PCR_DATA_MAX 64
/* Nesting the decoder follows when skipping values it does not need (bounds the recursion). */
#define CBOR_MAX_DEPTH 16

enum {
    CBOR_UINT = 0,
    CBOR_NEGINT = 1,
    CBOR_BYTES = 2,
    CBOR_TEXT = 3,
    CBOR_ARRAY = 4,
    CBOR_MAP = 5,
    CBOR_TAG = 6,
    CBOR_SIMPLE = 7,
};

/* false and true: major type 7 with the value in the initial byte (RFC 8949 3.3). */
#define CBOR_FALSE_BYTE 0xF4
#define CBOR_TRUE_BYTE 0xF5

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fail(const char *fmt, ...)
{
    va_list ap;
    fflush(stdout);
    fputs("nsm-pcr: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* --- CBOR decoding (RFC 8949), definite lengths only ------------------------------------ */

struct cursor {
    const uint8_t *buf;
    size_t len;
    size_t pos;
};

/* One data item's head: its major type and argument (length, value or simple value). */
static bool cbor_head(struct cursor *c, int *major, uint64_t *arg)
{
    if (c->pos >= c->len)
        return false;
    uint8_t ib = c->buf[c->pos++];
    uint8_t info = ib & 0x1F;
    *major = ib >> 5;
    if (info < 24) {
        *arg = info;
        return true;
    }
    if (info > 27) /* 28-30 reserved, 31 indefinite length: neither is used by the NSM */
        return false;
    size_t n = (size_t)1 << (info - 24);
    if (c->len - c->pos < n)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++)
        v = (v << 8) | c->buf[c->pos++];
    *arg = v;
    return true;
}

/* A byte or text string's contents; the pointer stays inside the buffer. */
static bool cbor_string(struct cursor *c, int want_major, const uint8_t **data, size_t *len)
{
    int major;
    uint64_t arg;
    if (!cbor_head(c, &major, &arg) || major != want_major || arg > c->len - c->pos)
        return false;
    *data = c->buf + c->pos;
    *len = (size_t)arg;
    c->pos += (size_t)arg;
    return true;
}

/* Skip one data item whatever it is (values the caller does not need, e.g. new fields). */
static bool cbor_skip(struct cursor *c, int depth)
{
    int major;
    uint64_t arg;
    if (depth > CBOR_MAX_DEPTH || !cbor_head(c, &major, &arg))
        return false;
    switch (major) {
    case CBOR_UINT:
    case CBOR_NEGINT:
    case CBOR_SIMPLE:
        return true;
    case CBOR_BYTES:
    case CBOR_TEXT:
        if (arg > c->len - c->pos)
            return false;
        c->pos += (size_t)arg;
        return true;
    case CBOR_TAG:
        return cbor_skip(c, depth + 1);
    case CBOR_ARRAY:
    case CBOR_MAP: {
        /* Every item takes at least one byte: a count beyond the rest is malformed, and
         * checking it first keeps a forged huge count from looping for long. */
        uint64_t items = major == CBOR_MAP ? arg * 2 : arg;
        if (arg > c->len - c->pos || items > c->len - c->pos)
            return false;
        for (uint64_t i = 0; i < items; i++)
            if (!cbor_skip(c, depth + 1))
                return false;
        return true;
    }
    }
    return false;
}

/* Only the one-byte forms: a half float or a two-byte simple value is no boolean. */
static bool cbor_bool(struct cursor *c, bool *value)
{
    if (c->pos >= c->len ||
        (c->buf[c->pos] != CBOR_FALSE_BYTE && c->buf[c->pos] != CBOR_TRUE_BYTE))
        return false;
    *value = c->buf[c->pos++] == CBOR_TRUE_BYTE;
    return true;
}

static bool text_is(const uint8_t *data, size_t len, const char *want)
{
    return len == strlen(want) && memcmp(data, want, len) == 0;
}

/* --- the request and its response ------------------------------------------------------- */

static size_t encode_request(uint8_t *out, unsigned index)
{
    /* {"DescribePCR": {"index": N}}: maps of one pair, keys as text strings (serde_cbor). */
    static const uint8_t prefix[] = {
        0xA1, 0x6B, 'D', 'e', 's', 'c', 'r', 'i', 'b', 'e', 'P', 'C', 'R',
        0xA1, 0x65, 'i', 'n', 'd', 'e', 'x',
    };
    size_t n = sizeof(prefix);
    memcpy(out, prefix, n);
    /* Shortest form of the unsigned integer, as CBOR's preferred serialization says. */
    if (index < 24) {
        out[n++] = (uint8_t)index;
    } else if (index <= 0xFF) {
        out[n++] = 0x18;
        out[n++] = (uint8_t)index;
    } else {
        out[n++] = 0x19;
        out[n++] = (uint8_t)(index >> 8);
        out[n++] = (uint8_t)index;
    }
    return n;
}

/* Text from the response made safe to print on one line (at most 63 bytes of it). */
static const char *printable(const uint8_t *text, size_t len)
{
    static char out[64];
    size_t n = len < sizeof(out) - 1 ? len : sizeof(out) - 1;
    for (size_t i = 0; i < n; i++)
        out[i] = text[i] >= 0x20 && text[i] < 0x7F ? (char)text[i] : '?';
    out[n] = '\0';
    return out;
}

/* {"DescribePCR": {"lock": bool, "data": bstr}} (pairs in any order) or {"Error": text}. */
static void decode_response(unsigned index, const uint8_t *buf, size_t len, bool *lock,
                            const uint8_t **data, size_t *data_len)
{
    struct cursor c = {buf, len, 0};
    int major;
    uint64_t pairs;
    const uint8_t *key;
    size_t key_len;

    if (!cbor_head(&c, &major, &pairs) || major != CBOR_MAP || pairs != 1)
        fail("DescribePCR %u: response is not a CBOR map of one entry", index);
    if (!cbor_string(&c, CBOR_TEXT, &key, &key_len))
        fail("DescribePCR %u: response's key is not a text string", index);
    if (text_is(key, key_len, "Error")) {
        const uint8_t *text;
        size_t text_len;
        if (!cbor_string(&c, CBOR_TEXT, &text, &text_len))
            fail("DescribePCR %u: malformed Error response", index);
        fail("DescribePCR %u: NSM error %s", index, printable(text, text_len));
    }
    if (!text_is(key, key_len, "DescribePCR"))
        fail("DescribePCR %u: unexpected response %s", index, printable(key, key_len));
    if (!cbor_head(&c, &major, &pairs) || major != CBOR_MAP)
        fail("DescribePCR %u: DescribePCR response is not a map", index);
    bool have_lock = false, have_data = false;
    for (uint64_t i = 0; i < pairs; i++) {
        if (!cbor_string(&c, CBOR_TEXT, &key, &key_len))
            fail("DescribePCR %u: malformed DescribePCR response (key %llu)", index,
                 (unsigned long long)i);
        if (text_is(key, key_len, "lock")) {
            if (have_lock || !cbor_bool(&c, lock))
                fail("DescribePCR %u: lock is not a single boolean", index);
            have_lock = true;
        } else if (text_is(key, key_len, "data")) {
            if (have_data || !cbor_string(&c, CBOR_BYTES, data, data_len))
                fail("DescribePCR %u: data is not a single byte string", index);
            if (*data_len > PCR_DATA_MAX)
                fail("DescribePCR %u: data is %zu bytes (at most %d)", index, *data_len,
                     PCR_DATA_MAX);
            have_data = true;
        } else if (!cbor_skip(&c, 0)) {
            /* A field newer than this tool is ignored; only a malformed one is an error. */
            fail("DescribePCR %u: malformed DescribePCR response", index);
        }
    }
    if (!have_lock || !have_data)
        fail("DescribePCR %u: response lacks %s", index, have_lock ? "data" : "lock");
    if (c.pos != c.len)
        fail("DescribePCR %u: %zu trailing byte(s) after the response", index, c.len - c.pos);
}

static void describe_pcr(unsigned index)
{
    static uint8_t response[NSM_RESPONSE_MAX_SIZE];
    uint8_t request[32];
    size_t request_len = encode_request(request, index);
    struct nsm_raw raw = {
        .request = {(__u64)(uintptr_t)request, request_len},
        .response = {(__u64)(uintptr_t)response, sizeof(response)},
    };

    /* Opened per request, as the NSM libraries do; the driver serialises requests itself. */
    int fd = open(NSM_DEVICE, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        fail("open %s: %s", NSM_DEVICE, strerror(errno));
    if (ioctl(fd, NSM_IOCTL_RAW, &raw) < 0) {
        int err = errno;
        close(fd);
        fail("DescribePCR %u: ioctl NSM_IOCTL_RAW on %s: %s", index, NSM_DEVICE, strerror(err));
    }
    close(fd);
    /* The driver replaces response.len with the response's real length. */
    if (raw.response.len == 0 || raw.response.len > sizeof(response))
        fail("DescribePCR %u: response length %llu out of range", index,
             (unsigned long long)raw.response.len);

    bool lock = false;
    const uint8_t *data = NULL;
    size_t data_len = 0;
    decode_response(index, response, (size_t)raw.response.len, &lock, &data, &data_len);

    char hex[2 * PCR_DATA_MAX + 1];
    for (size_t i = 0; i < data_len; i++)
        snprintf(hex + 2 * i, 3, "%02x", data[i]);
    hex[2 * data_len] = '\0';
    /* json.dumps's default separators, so both tools' lines compare equal as text. */
    printf("{\"index\": %u, \"lock\": %s, \"data\": \"%s\"}\n", index, lock ? "true" : "false",
           hex);
    if (fflush(stdout) != 0)
        fail("writing stdout: %s", strerror(errno));
}

static unsigned parse_index(const char *arg)
{
    char *end;
    if (arg[0] < '0' || arg[0] > '9')
        fail("%s: not a PCR index (0-%d)", arg, PCR_INDEX_MAX);
    errno = 0;
    unsigned long v = strtoul(arg, &end, 10);
    if (errno != 0 || *end != '\0' || v > PCR_INDEX_MAX)
        fail("%s: not a PCR index (0-%d)", arg, PCR_INDEX_MAX);
    return (unsigned)v;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        fail("usage: nsm-pcr INDEX...");
    /* All arguments are checked before the first request: a typo reads no PCR at all. */
    for (int i = 1; i < argc; i++)
        parse_index(argv[i]);
    for (int i = 1; i < argc; i++)
        describe_pcr(parse_index(argv[i]));
    return 0;
}
