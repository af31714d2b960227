"""lib.certs.cert_fingerprint: the SHA-256 of the leaf a client sees, whatever the file holds
(a client pins it and protocol 2 signs binds for it, docs/PROTOCOL.md "Proxy id")."""
import hashlib
import ssl

import pytest
import trustme

from lib.certs import cert_fingerprint


def test_fingerprint_is_the_leafs_whatever_surrounds_it(tmp_path):
    ca = trustme.CA()
    leaf = ca.issue_cert("proxy.test")
    pem = leaf.cert_chain_pems[0].bytes()
    der = ssl.PEM_cert_to_DER_cert(pem.decode())
    want = hashlib.sha256(der).hexdigest()
    # openssl tools write "subject=" / "Bag Attributes" lines before the PEM; a chain follows it
    for data in [pem, der, b"subject=CN = proxy.test\nissuer=CN = ca\n" + pem,
                 pem + ca.cert_pem.bytes()]:
        assert cert_fingerprint(data) == want
        path = tmp_path / "cert.pem"
        path.write_bytes(data)
        assert cert_fingerprint(str(path)) == want
    with pytest.raises(ValueError):
        cert_fingerprint(pem[: pem.index(b"-----END")])
