/*
 * nitro-init: PID 1 of a Nitro enclave, as nitro-cli's bootstrap ramdisk carries it.
 *
 * Order (docs/boot.md#init):
 *   1. mount devtmpfs on /dev; stdio on /dev/console
 *   2. load the kernel modules listed in /modules/order (harness extension: Debian's cloud
 *      kernel has virtio_mmio and vsock as modules; AWS's kernel blobs build them in and their
 *      bootstrap ramdisk has no /modules, so this step is skipped there)
 *   3. load /nsm.ko with finit_module if present, then delete it
 *   4. heartbeat: AF_VSOCK stream to CID 3 port 9000, write 0xB7, read 0xB7 back, close
 *   5. read /env and /cmd (both must exist), delete them
 *   6. switch root into /rootfs (bind, move, chroot)
 *   7. mount proc, /run, /tmp, /dev, /dev/shm, /dev/pts, sysfs, cgroup v1 controllers
 *   8. fork, setsid, exec argv[0] searched in /sbin:/usr/sbin:/bin:/usr/bin, cwd /
 *   9. reap children until the application exits, then reboot (which ends the enclave)
 *
 * Every step logs one line to the console prefixed "nitro-init: " so that a failed boot can be
 * diagnosed from the console alone. A fatal error logs "nitro-init: fatal: <why>" and ends the
 * VM (see die()). Built static (gcc -static): the bootstrap ramdisk has no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>
#include <linux/vm_sockets.h>

#define LOG_PREFIX "nitro-init: "

/* docs/vsock.md#heartbeat: the parent is CID 3; nitro-cli listens on port 9000 and expects
 * 0xB7 echoed. */
#define HEARTBEAT_CID 3
#define HEARTBEAT_PORT 9000
#define HEARTBEAT_BYTE 0xB7
/* Module-based kernels bind the vsock device asynchronously to init; nitro-cli waits 90 s for
 * the heartbeat, so retrying for 15 s here only hides a short race, never a real failure. */
#define HEARTBEAT_RETRY_MS 15000
#define HEARTBEAT_RETRY_STEP_MS 50

#define DEFAULT_PATH "PATH=/sbin:/usr/sbin:/bin:/usr/bin"
#define SEARCH_PATH "/sbin:/usr/sbin:/bin:/usr/bin"
#define MAX_CONFIG_BYTES (1 << 20)

static double uptime(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_BOOTTIME, &ts) != 0)
        return 0.0;
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One console line: "nitro-init: <message> (t=<seconds since boot>s)". */
static void logmsg(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    int n = snprintf(buf, sizeof(buf), LOG_PREFIX);
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof(buf) - (size_t)n, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 32)
        n = (int)sizeof(buf) - 32;
    n += snprintf(buf + n, sizeof(buf) - (size_t)n, " (t=%.3fs)\n", uptime());
    /* One write per line, so lines from init and the kernel do not interleave mid-line. */
    ssize_t unused = write(STDERR_FILENO, buf, (size_t)n);
    (void)unused;
}

/*
 * End the enclave after a fatal error. reboot(RB_AUTOBOOT) is what ends a Nitro enclave (the
 * hypervisor terminates it) and what ends QEMU run with -no-reboot; RB_POWER_OFF would only
 * halt the CPU on a machine without ACPI power-off (Nitro's, QEMU's nitro-enclave), leaving
 * the VM hanging until a timeout.
 */
static void __attribute__((noreturn)) die(const char *fmt, ...)
{
    char buf[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    logmsg("fatal: %s; ending the enclave", buf);
    sync();
    reboot(RB_AUTOBOOT);
    for (;;)
        pause();
}

static void mkdir_p(const char *path, mode_t mode)
{
    char tmp[512];
    snprintf(tmp, sizeof(tmp), "%s", path);
    for (char *p = tmp + 1; *p; p++) {
        if (*p == '/') {
            *p = '\0';
            mkdir(tmp, mode);
            *p = '/';
        }
    }
    mkdir(tmp, mode);
}

/* Step 1: devtmpfs and the console. Without a console nothing below can be reported, so if
 * devtmpfs fails, fall back to a hand-made /dev/console node to report why. */
static void init_dev_and_console(void)
{
    int mount_errno = 0;
    if (mount("dev", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, NULL) != 0 && errno != EBUSY) {
        mount_errno = errno;
        mknod("/dev/console", S_IFCHR | 0600, makedev(5, 1));
    }
    /* No O_CLOEXEC: when the kernel found no console, this open returns fd 0 itself, which
     * the application must inherit. */
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd >= 0) {
        dup2(fd, STDIN_FILENO);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
        if (fd > STDERR_FILENO)
            close(fd);
    }
    logmsg("started (pid %d)", (int)getpid());
    if (mount_errno)
        die("mount devtmpfs on /dev: %s", strerror(mount_errno));
    if (fd < 0)
        die("open /dev/console: %s", strerror(errno));
    logmsg("mounted devtmpfs on /dev, console on stdio");
}

/* Load one module file with finit_module(2); a module already present (built in or loaded)
 * counts as loaded. Returns 0 or an errno value. */
static int load_module(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno;
    int rc = (int)syscall(SYS_finit_module, fd, "", 0);
    int err = rc == 0 ? 0 : errno;
    close(fd);
    return err == EEXIST ? 0 : err;
}

/* Read a whole small file into a NUL-terminated heap buffer. Returns NULL with errno set. */
static char *read_file(const char *path, size_t *len_out)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return NULL;
    char *buf = malloc(MAX_CONFIG_BYTES + 1);
    size_t len = 0;
    if (!buf) {
        close(fd);
        errno = ENOMEM;
        return NULL;
    }
    for (;;) {
        if (len == MAX_CONFIG_BYTES) {
            free(buf);
            close(fd);
            errno = EFBIG;
            return NULL;
        }
        ssize_t n = read(fd, buf + len, MAX_CONFIG_BYTES - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            int e = errno;
            free(buf);
            close(fd);
            errno = e;
            return NULL;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    buf[len] = '\0';
    if (len_out)
        *len_out = len;
    return buf;
}

/* Step 2 (harness extension): /modules/order lists module files of /modules, one per line,
 * in load (dependency) order. Each file is deleted once loaded to give its RAM back. */
static void load_module_list(void)
{
    size_t len;
    char *order = read_file("/modules/order", &len);
    if (!order) {
        if (errno == ENOENT) {
            logmsg("no /modules/order: kernel has its drivers built in");
            return;
        }
        die("read /modules/order: %s", strerror(errno));
    }
    int count = 0;
    for (char *line = strtok(order, "\n"); line; line = strtok(NULL, "\n")) {
        if (!*line || strchr(line, '/'))
            die("/modules/order: bad entry '%s' (want a file name in /modules)", line);
        char path[512];
        snprintf(path, sizeof(path), "/modules/%s", line);
        int err = load_module(path);
        if (err)
            die("load module %s: %s", path, strerror(err));
        unlink(path);
        logmsg("loaded module %s", line);
        count++;
    }
    free(order);
    unlink("/modules/order");
    rmdir("/modules");
    logmsg("loaded %d module(s) from /modules/order", count);
}

/* Step 3: the NSM driver (docs/boot.md#init). Absent is fine (a kernel with NSM built in). */
static void load_nsm(void)
{
    if (access("/nsm.ko", F_OK) != 0) {
        logmsg("no /nsm.ko: not loading the NSM driver");
        return;
    }
    int err = load_module("/nsm.ko");
    if (err)
        die("load /nsm.ko: %s", strerror(err));
    if (unlink("/nsm.ko") != 0)
        die("delete /nsm.ko: %s", strerror(errno));
    logmsg("loaded /nsm.ko");
}

static int heartbeat_retryable(int err)
{
    switch (err) {
    case EAFNOSUPPORT:   /* vsock core not registered yet */
    case ENODEV:         /* no transport bound yet */
    case ENETUNREACH:
    case EHOSTUNREACH:
    case ECONNRESET:     /* parent not listening yet: RST */
    case ECONNREFUSED:
    case ETIMEDOUT:
    case EADDRNOTAVAIL:
    case EAGAIN:
    case EINTR:
        return 1;
    default:
        return 0;
    }
}

/* Step 4: tell the parent the enclave booted (docs/vsock.md#heartbeat). */
static void heartbeat(void)
{
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof(addr));
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = HEARTBEAT_CID;
    addr.svm_port = HEARTBEAT_PORT;

    int fd = -1, err = 0, attempts = 0;
    double deadline = uptime() + HEARTBEAT_RETRY_MS / 1000.0;
    for (;;) {
        attempts++;
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof(addr)) == 0)
            break;
        err = errno;
        if (fd >= 0)
            close(fd);
        fd = -1;
        if (!heartbeat_retryable(err) || uptime() >= deadline)
            die("heartbeat: connect to vsock %d:%d: %s (after %d attempt(s))", HEARTBEAT_CID,
                HEARTBEAT_PORT, strerror(err), attempts);
        if (attempts == 1)
            logmsg("heartbeat: connect to vsock %d:%d: %s; retrying for up to %d ms",
                   HEARTBEAT_CID, HEARTBEAT_PORT, strerror(err), HEARTBEAT_RETRY_MS);
        struct timespec step = {0, HEARTBEAT_RETRY_STEP_MS * 1000000L};
        nanosleep(&step, NULL);
    }

    unsigned char byte = HEARTBEAT_BYTE;
    ssize_t n;
    do
        n = write(fd, &byte, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1)
        die("heartbeat: write to vsock %d:%d: %s", HEARTBEAT_CID, HEARTBEAT_PORT,
            n < 0 ? strerror(errno) : "short write");
    byte = 0;
    do
        n = read(fd, &byte, 1);
    while (n < 0 && errno == EINTR);
    if (n != 1)
        die("heartbeat: read from vsock %d:%d: %s", HEARTBEAT_CID, HEARTBEAT_PORT,
            n < 0 ? strerror(errno) : "connection closed before the reply");
    if (byte != HEARTBEAT_BYTE)
        die("heartbeat: parent answered 0x%02X, expected 0x%02X", byte, HEARTBEAT_BYTE);
    close(fd);
    logmsg("heartbeat: sent 0x%02X to vsock %d:%d and got it back", HEARTBEAT_BYTE,
           HEARTBEAT_CID, HEARTBEAT_PORT);
}

/*
 * Step 5: /cmd and /env (docs/boot.md#cmd-and-env): one entry per line, each line ended by '\n' (a
 * last line without one counts too). cmd keeps empty lines (an empty argv element is legal); env
 * drops them. Returns a NULL-terminated vector; *count receives its length.
 */
static char **read_lines(const char *path, int keep_empty, int *count)
{
    size_t len;
    char *buf = read_file(path, &len);
    if (!buf)
        die("read %s: %s (nitro-cli's customer ramdisk always has it)", path, strerror(errno));
    int cap = 1;
    for (size_t i = 0; i < len; i++)
        cap += buf[i] == '\n';
    char **vec = calloc((size_t)cap + 2, sizeof(char *));
    if (!vec)
        die("read %s: out of memory", path);
    int n = 0;
    char *p = buf, *end = buf + len;
    while (p < end) {
        char *nl = memchr(p, '\n', (size_t)(end - p));
        if (nl)
            *nl = '\0';
        if (*p || keep_empty)
            vec[n++] = p;
        p = nl ? nl + 1 : end;
    }
    vec[n] = NULL;
    *count = n;
    return vec;
}

/* Step 6: make /rootfs the root (bind, move, chroot), as nitro-cli's init does. */
static void switch_root(void)
{
    if (mount("/rootfs", "/rootfs", NULL, MS_BIND | MS_REC, NULL) != 0)
        die("bind-mount /rootfs: %s", strerror(errno));
    if (chdir("/rootfs") != 0)
        die("chdir /rootfs: %s", strerror(errno));
    if (mount(".", "/", NULL, MS_MOVE, NULL) != 0)
        die("move /rootfs to /: %s", strerror(errno));
    if (chroot(".") != 0)
        die("chroot /rootfs: %s", strerror(errno));
    if (chdir("/") != 0)
        die("chdir / in the new root: %s", strerror(errno));
    logmsg("switched root to /rootfs");
}

struct mount_op {
    const char *source, *target, *type;
    unsigned long flags;
    const char *data;
    int required;
};

/* Step 7: the filesystems an application expects (docs/boot.md#init). Optional ones may fail
 * (a kernel without devpts, say) with a logged warning. */
static const struct mount_op mounts[] = {
    {"proc", "/proc", "proc", MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL, 1},
    {"tmpfs", "/run", "tmpfs", MS_NODEV | MS_NOSUID, "mode=0755", 1},
    {"tmpfs", "/tmp", "tmpfs", MS_NODEV | MS_NOSUID, NULL, 1},
    {"dev", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, NULL, 1},
    {"shm", "/dev/shm", "tmpfs", MS_NODEV | MS_NOSUID, "mode=1777", 0},
    {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666", 0},
    {"sysfs", "/sys", "sysfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL, 1},
    {"cgroup_root", "/sys/fs/cgroup", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, "mode=0755", 0},
};

static void mount_filesystems(void)
{
    int failed = 0;
    for (size_t i = 0; i < sizeof(mounts) / sizeof(mounts[0]); i++) {
        const struct mount_op *m = &mounts[i];
        mkdir_p(m->target, 0755);
        if (mount(m->source, m->target, m->type, m->flags, m->data) != 0 && errno != EBUSY) {
            if (m->required)
                die("mount %s on %s: %s", m->type, m->target, strerror(errno));
            logmsg("warning: mount %s on %s: %s", m->type, m->target, strerror(errno));
            failed++;
        }
    }
    logmsg("mounted proc, /run, /tmp, /dev, /dev/shm, /dev/pts, sysfs (%d optional failed)",
           failed);
}

/* Cgroup v1: one hierarchy per enabled controller listed in /proc/cgroups. */
static void mount_cgroups(void)
{
    FILE *f = fopen("/proc/cgroups", "re");
    if (!f) {
        logmsg("warning: no /proc/cgroups (%s): no cgroup controllers", strerror(errno));
        return;
    }
    char line[256], done[512] = "";
    int ok = 0, failed = 0;
    while (fgets(line, sizeof(line), f)) {
        char name[64];
        int hierarchy, num, enabled;
        if (line[0] == '#' || sscanf(line, "%63s %d %d %d", name, &hierarchy, &num, &enabled) != 4
            || !enabled)
            continue;
        char path[128];
        snprintf(path, sizeof(path), "/sys/fs/cgroup/%s", name);
        mkdir(path, 0555);
        if (mount("cgroup", path, "cgroup", MS_NODEV | MS_NOSUID | MS_NOEXEC, name) == 0) {
            ok++;
            if (strlen(done) + strlen(name) + 2 < sizeof(done)) {
                if (*done)
                    strcat(done, ",");
                strcat(done, name);
            }
        } else {
            failed++;
            logmsg("warning: mount cgroup %s: %s", name, strerror(errno));
        }
    }
    fclose(f);
    logmsg("mounted %d cgroup v1 controller(s) [%s], %d failed", ok, done, failed);
}

/* execve argv[0] as is if it has a '/', else the first hit in SEARCH_PATH (docs/boot.md#init).
 * Returns only on failure, with errno of the most telling attempt. */
static void exec_searched(char **argv, char **envp)
{
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, envp);
        return;
    }
    int saved = ENOENT;
    char path[4096];
    const char *dir = SEARCH_PATH;
    while (*dir) {
        const char *colon = strchr(dir, ':');
        size_t dlen = colon ? (size_t)(colon - dir) : strlen(dir);
        snprintf(path, sizeof(path), "%.*s/%s", (int)dlen, dir, argv[0]);
        execve(path, argv, envp);
        if (errno != ENOENT && errno != ENOTDIR)
            saved = errno;
        dir += dlen + (colon ? 1 : 0);
    }
    errno = saved;
}

/* Step 8: run the application in its own session, with the signals init blocks unblocked. */
static pid_t launch(char **argv, char **envp, const sigset_t *orig_mask)
{
    pid_t pid = fork();
    if (pid < 0)
        die("fork: %s", strerror(errno));
    if (pid == 0) {
        sigprocmask(SIG_SETMASK, orig_mask, NULL);
        if (setsid() < 0)
            logmsg("warning: setsid: %s", strerror(errno));
        if (chdir("/") != 0)
            logmsg("warning: chdir /: %s", strerror(errno));
        exec_searched(argv, envp);
        logmsg("fatal: exec %s (searched in %s): %s", argv[0], SEARCH_PATH, strerror(errno));
        _exit(127);
    }
    return pid;
}

static void log_argv(char **argv, int argc, int envc)
{
    char buf[600];
    size_t n = 0;
    for (int i = 0; i < argc && n < sizeof(buf) - 8; i++)
        n += (size_t)snprintf(buf + n, sizeof(buf) - n, "%s'%s'", i ? " " : "", argv[i]);
    if (n >= sizeof(buf) - 8)
        strcpy(buf + sizeof(buf) - 8, "...");
    logmsg("starting application: %s (%d environment variable(s))", buf, envc);
}

int main(void)
{
    /* PID 1 must not die of a signal; blocking them all still lets wait() see SIGCHLD. */
    sigset_t all, orig;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &orig);

    init_dev_and_console();
    load_module_list();
    load_nsm();
    heartbeat();

    int envc, argc;
    char **envp = read_lines("/env", 0, &envc);
    char **argv = read_lines("/cmd", 1, &argc);
    if (unlink("/env") != 0 || unlink("/cmd") != 0)
        die("delete /env and /cmd: %s", strerror(errno));
    static char default_path[] = DEFAULT_PATH;
    static char default_cmd[] = "sh";
    if (envc == 0) {
        envp[0] = default_path;
        envp[1] = NULL;
        logmsg("read /env: empty, using %s", DEFAULT_PATH);
    } else {
        logmsg("read /env: %d variable(s)", envc);
    }
    if (argc == 0) {
        argv[0] = default_cmd;
        argv[1] = NULL;
        argc = 1;
        logmsg("read /cmd: empty, running sh");
    } else {
        logmsg("read /cmd: %d argument(s)", argc);
    }

    switch_root();
    mount_filesystems();
    mount_cgroups();

    log_argv(argv, argc, envc ? envc : 1);
    pid_t app = launch(argv, envp, &orig);

    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            logmsg("wait: %s", strerror(errno));
            break;
        }
        if (pid != app)
            continue;
        if (WIFEXITED(status))
            logmsg("application exited with status %d; rebooting", WEXITSTATUS(status));
        else if (WIFSIGNALED(status))
            logmsg("application killed by signal %d; rebooting", WTERMSIG(status));
        break;
    }
    sync();
    /* docs/boot.md#enclave-end: the enclave ends when init reboots (QEMU runs with -no-reboot). */
    reboot(RB_AUTOBOOT);
    die("reboot: %s", strerror(errno));
}
