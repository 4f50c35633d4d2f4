"""A TCP-to-vsock forwarder, as enclave images carry one: connections to 127.0.0.1:<port>
are relayed to vsock <cid>:<vsock port> (the parent's vsock-proxy), bytes both ways, each
direction's end passed on. TLS stays end to end between the application and KMS.

Usage: vsock_forwarder.py <tcp port> <cid> <vsock port>; /run/vsock-forwarder.ready appears
once it listens.
"""

import socket
import sys
import threading


def pump(source, target):
    try:
        while True:
            data = source.recv(65536)
            if not data:
                break
            target.sendall(data)
    except OSError:
        pass
    finally:
        try:
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def relay(conn, cid, port):
    upstream = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    try:
        upstream.connect((cid, port))
    except OSError as err:
        print(f"vsock_forwarder: vsock {cid}:{port}: {err}", flush=True)
        conn.close()
        upstream.close()
        return
    back = threading.Thread(target=pump, args=(upstream, conn), daemon=True)
    back.start()
    pump(conn, upstream)
    back.join()
    conn.close()
    upstream.close()


def main():
    tcp_port, cid, vsock_port = (int(a) for a in sys.argv[1:4])
    server = socket.create_server(("127.0.0.1", tcp_port))
    open("/run/vsock-forwarder.ready", "w").close()
    while True:
        conn, _ = server.accept()
        threading.Thread(target=relay, args=(conn, cid, vsock_port), daemon=True).start()


if __name__ == "__main__":
    main()
