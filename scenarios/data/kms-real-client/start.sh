#!/bin/sh
# The enclave's start-up, the usual production pattern for an AWS SDK in an enclave: loopback
# up, the KMS endpoint's name on 127.0.0.1 (build-enclave rewrites /etc/hosts, as nitro-cli
# does, so the entry is added at start), a local TCP-to-vsock forwarder on 127.0.0.1:443 towards
# the parent's vsock-proxy (CID 3, port 8000), then the application. The enclave stays up after
# it, as a service would.
set -e
ip link set lo up
echo "127.0.0.1 kms.${AWS_REGION}.amazonaws.com" >> /etc/hosts
python3 /app/vsock_forwarder.py 443 3 8000 &
while [ ! -e /run/vsock-forwarder.ready ]; do sleep 0.2; done
python3 /app/client.py || echo "kms-real-client: exited $?"
exec sleep 1000000
