"""An enclave application as production ones are written: PyPI's boto3, unchanged, calling KMS
at its usual endpoint (https://kms.<region>.amazonaws.com, which /etc/hosts and the local
forwarder lead to the parent's vsock-proxy), with the attestation document of /dev/nsm as the
Recipient, and the CiphertextForRecipient (CMS EnvelopedData) opened with `cryptography`.

For each key alias in APP_KEYS: GenerateDataKey with a Recipient (the data key comes back only
encrypted to the enclave's RSA key), Decrypt of its CiphertextBlob with a Recipient, and the two
data keys compared. One line per key on stdout:

    kms-real-client: <alias>: allowed: GenerateDataKey and Decrypt, data key sha256 <hex> matches
    kms-real-client: <alias>: AccessDeniedException: <KMS's message>
"""

import hashlib
import os

import aws_nsm_interface
import boto3
from asn1crypto import cms
from botocore.exceptions import ClientError
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import padding as asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes


def say(text):
    print(f"kms-real-client: {text}", flush=True)


def attestation_document(public_key_der):
    """The NSM's attestation document naming our public key."""
    try:
        device = aws_nsm_interface.open_nsm_device()
    except OSError:
        # aws-nsm-interface opens /dev/nsm buffered, which needs llseek; the upstream nsm
        # driver has none, so open the descriptor unbuffered.
        device = open(aws_nsm_interface.NSM_DEV_FILE, "r+b", buffering=0)
    try:
        return aws_nsm_interface.get_attestation_doc(device, public_key=public_key_der)["document"]
    finally:
        aws_nsm_interface.close_nsm_device(device)


def open_for_recipient(blob, private_key):
    """The plaintext of a CiphertextForRecipient: CMS EnvelopedData (BER), RSAES-OAEP-SHA-256
    key transport to our key, AES-256-CBC content."""
    enveloped = cms.ContentInfo.load(blob)["content"]
    (recipient,) = enveloped["recipient_infos"]
    content_key = private_key.decrypt(
        recipient.chosen["encrypted_key"].native,
        asym_padding.OAEP(mgf=asym_padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None))
    content = enveloped["encrypted_content_info"]
    iv = content["content_encryption_algorithm"]["parameters"].native
    decryptor = Cipher(algorithms.AES(content_key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(content["encrypted_content"].native) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def main():
    kms = boto3.client("kms", region_name=os.environ["AWS_REGION"])
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    recipient = {"KeyEncryptionAlgorithm": "RSAES_OAEP_SHA_256",
                 "AttestationDocument": attestation_document(public_der)}
    say(f"endpoint {kms.meta.endpoint_url}, boto3 {boto3.__version__}")
    for alias in os.environ["APP_KEYS"].split(","):
        try:
            generated = kms.generate_data_key(KeyId=alias, KeySpec="AES_256", Recipient=recipient)
            data_key = open_for_recipient(generated["CiphertextForRecipient"], private_key)
            decrypted = kms.decrypt(CiphertextBlob=generated["CiphertextBlob"], Recipient=recipient)
            again = open_for_recipient(decrypted["CiphertextForRecipient"], private_key)
        except ClientError as err:
            error = err.response["Error"]
            say(f"{alias}: {error['Code']}: {error['Message']}")
            continue
        digest = hashlib.sha256(data_key).hexdigest()[:16]
        verdict = "matches" if again == data_key and len(data_key) == 32 else "DIFFERS"
        say(f"{alias}: allowed: GenerateDataKey and Decrypt, data key sha256 {digest} {verdict}")
    say("done")


if __name__ == "__main__":
    main()
