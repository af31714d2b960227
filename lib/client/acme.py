"""Certificates for ``https:NAME`` services by ACME (RFC 8555), validated with TLS-ALPN-01
(RFC 8737) that this client answers itself through the proxies.

    book = CertBook()                                   # lib.client.terminate
    manager = CertManager(AcmeConfig(directory=URL, email=None, ca_file=None,
                                     data_dir=DIR, session=make_session),
                          ["example.com"], book, ready=client_ready)
    manager.start()        # one greenlet per name: load, order when missing, renew, forever
    manager.stop()

What we use the ``acme`` library (certbot's, with josepy) for: JWS signing, nonces, the
directory, account, order, challenge, finalize and ARI messages. What is ours and why:
  - the retry of ``badNonce`` beyond the library's one retry: RFC 8555 section 6.5 says a client
    should retry, and a CA may reject many nonces in a row (pebble rejects 5 %, tests 50 %);
  - the error texts: ``rateLimited`` with the time from Retry-After (the library drops the
    headers of an error response; a requests response hook keeps the last one), a failed
    challenge with the CA's own words;
  - the schedule: renew when a third of the lifetime remains, or inside the CA's ARI window;
  - the transport: each order gets a requests session from ``AcmeConfig.session(key)``, which
    in Tor mode goes through tor's SOCKS port with its own isolation key, so each order has its
    own circuit and the CA never sees this machine's address (docs/SECURITY.md).

Files (data dir, mode 0600): ``acme/account.json`` (the account key, a JWK), and per name
``acme/NAME/cert.pem`` (full chain) and ``acme/NAME/key.pem``; a restart presents them at once
and orders nothing until renewal is due.
"""
from __future__ import annotations

import datetime
import logging
import os
import time
from dataclasses import dataclass
from typing import Callable

import gevent
import josepy as jose
from acme import challenges, client as acme_client, crypto_util, errors, messages
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lib.acmetls import challenge_certificate
from lib.errors import ShroudError

log = logging.getLogger("shroud.client.acme")

LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"
BAD_NONCE_TRIES = 20  # at pebble's 50 % rejection, 20 tries fail one time in a million
ORDER_TIMEOUT = 180.0  # seconds for validation and issuance; over Tor each poll is slow
BOUND_WAIT = 60.0  # seconds to wait for every proxy to bind before ordering anyway
RETRY_MIN, RETRY_MAX = 30.0, 3600.0  # after a failed order; a CA's Retry-After wins
RENEW_FRACTION = 1 / 3  # renew when this share of the lifetime remains
ARI_RECHECK = 6 * 3600.0  # the draft's default when the CA says nothing


@challenges.ChallengeResponse.register
class TLSALPN01Response(challenges.KeyAuthorizationChallengeResponse):
    """The tls-alpn-01 answer: the key authorization (RFC 8737 section 3)."""

    typ = "tls-alpn-01"


@challenges.Challenge.register
class TLSALPN01(challenges.KeyAuthorizationChallenge):
    """tls-alpn-01 (RFC 8737). The acme library dropped its own class (certbot stopped using
    the challenge); the message is two fields, so it is declared here, and the certificate it
    needs is lib.acmetls.challenge_certificate."""

    response_cls = TLSALPN01Response
    typ = response_cls.typ

    def validation(self, account_key, **unused):
        return None  # the validation is a certificate, built from the key authorization


class AcmeError(ShroudError):
    """An order failed; ``retry_after`` (epoch seconds) when the CA said when to try again."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class AcmeConfig:
    directory: str
    data_dir: str
    session: Callable  # (isolation_key) -> requests.Session, through Tor in Tor mode
    email: str | None = None
    ca_file: str | None = None  # verifies the CA's HTTPS (a private CA, pebble)


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 from the start, replacing it atomically."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_or_create_account_key(data_dir: str) -> jose.JWKEC:
    path = os.path.join(data_dir, "account.json")
    try:
        with open(path, "rb") as f:
            return jose.JWKEC.json_loads(f.read())
    except FileNotFoundError:
        key = jose.JWKEC(key=ec.generate_private_key(ec.SECP256R1()))
        _write_private(path, key.json_dumps().encode())
        return key


def renewal_due(cert_pem: bytes) -> float:
    """Epoch seconds when a third of the certificate's lifetime remains."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start = cert.not_valid_before_utc.timestamp()
    end = cert.not_valid_after_utc.timestamp()
    return end - (end - start) * RENEW_FRACTION


def next_renewal(due: float, ari: float | None) -> float:
    """The earlier of our own schedule (a third of the lifetime left) and the time the CA's
    renewal information (ARI) picked in its suggested window: a CA that plans to revoke early
    moves its window forward, and we follow; a later window does not make us wait longer."""
    return due if ari is None else min(due, ari)


def _retry_nonce(call, *args):
    """``call(*args)``, again while the CA answers badNonce (RFC 8555 section 6.5): the library
    keeps the fresh nonce of each rejection and retries once itself."""
    for attempt in range(BAD_NONCE_TRIES):
        try:
            return call(*args)
        except messages.Error as e:
            if e.code != "badNonce" or attempt == BAD_NONCE_TRIES - 1:
                raise
            log.debug("badNonce, retrying: %s", e.detail)
    raise AssertionError("unreachable")


class CertManager:
    def __init__(self, config: AcmeConfig, names: list[str], book, ready: Callable[[], bool]):
        self.config = config
        self.names = list(names)
        self.book = book
        self.ready = ready  # () -> True once every proxy has bound our names
        self.dir = os.path.join(config.data_dir, "acme")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.account_key = load_or_create_account_key(self.dir)
        self.orders = 0  # orders placed by this process (tests read it from the log)
        self._greenlets: list[gevent.Greenlet] = []

    def start(self) -> None:
        for name in self.names:
            self._greenlets.append(gevent.spawn(self._run, name))

    def stop(self) -> None:
        gevent.killall(self._greenlets, block=True, timeout=2)

    # --- files -----------------------------------------------------------------------------

    def _paths(self, name: str) -> tuple[str, str]:
        d = os.path.join(self.dir, name)
        return os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")

    def _load(self, name: str) -> bytes | None:
        cert_path, key_path = self._paths(name)
        try:
            with open(cert_path, "rb") as f:
                cert_pem = f.read()
            end = x509.load_pem_x509_certificate(cert_pem).not_valid_after_utc.timestamp()
            if end <= time.time():
                # Visitors get a TLS alert until the new one comes, not an expired certificate.
                log.warning("%s: stored certificate expired at %s: ordering a new one", name,
                            _when(end))
                return None
            self.book.set_certificate(name, cert_path, key_path)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            if not isinstance(e, FileNotFoundError):
                log.warning("%s: stored certificate unusable (%s): ordering a new one", name, e)
            return None
        return cert_pem

    def _store(self, name: str, cert_pem: bytes, key_pem: bytes) -> None:
        cert_path, key_path = self._paths(name)
        os.makedirs(os.path.dirname(cert_path), mode=0o700, exist_ok=True)
        _write_private(key_path + ".new", key_pem)
        _write_private(cert_path + ".new", cert_pem)
        os.replace(key_path + ".new", key_path)
        os.replace(cert_path + ".new", cert_path)
        self.book.set_certificate(name, cert_path, key_path)

    # --- the loop --------------------------------------------------------------------------

    def _run(self, name: str) -> None:
        cert_pem = self._load(name)
        if cert_pem is not None:
            log.info("%s: certificate loaded from %s (renewal due %s)", name, self.dir,
                     _when(renewal_due(cert_pem)))
        failures = 0
        while True:
            due = time.time() if cert_pem is None else self._due(name, cert_pem)
            if due > time.time():
                gevent.sleep(min(due - time.time(), ARI_RECHECK))
                continue
            self._wait_ready(name)
            try:
                cert_pem = self.obtain(name)
                failures = 0
            except gevent.GreenletExit:
                raise
            except Exception as e:  # noqa: BLE001 - AcmeError, or a bug: a bug costs a retry
                # (logged with its traceback), never the name's certificate for good
                if not isinstance(e, AcmeError):
                    log.exception("%s: unexpected error while ordering", name)
                    e = AcmeError(f"{type(e).__name__}: {e}")
                failures += 1
                delay = min(RETRY_MAX, RETRY_MIN * 2 ** (failures - 1))
                if e.retry_after is not None:
                    delay = max(1.0, e.retry_after - time.time())
                log.error("%s: certificate not obtained: %s (next try in %.0f s)", name, e, delay)
                gevent.sleep(delay)

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + BOUND_WAIT
        while not self.ready() and time.monotonic() < deadline:
            gevent.sleep(0.2)
        if not self.ready():
            log.warning("%s: ordering before every proxy has bound it: the CA may reach one "
                        "that cannot answer", name)

    def _due(self, name: str, cert_pem: bytes) -> float:
        """When to renew: the CA's ARI window where it offers one, else at a third left."""
        due = renewal_due(cert_pem)
        if due <= time.time():
            return due
        return next_renewal(due, self._ari(name, cert_pem))

    def _ari(self, name: str, cert_pem: bytes) -> float | None:
        try:
            acme, _, _ = self._client(f"acme-ari-{name}-{time.time_ns()}")
            when, _recheck = acme.renewal_time(cert_pem)
        except (errors.Error, messages.Error, OSError, ValueError) as e:
            log.info("%s: no renewal information from the CA: %s", name, e)
            return None
        return None if when is None else when.timestamp()

    # --- one order -------------------------------------------------------------------------

    def _client(self, isolation_key: str):
        """(ClientV2, ClientNetwork, seen) on a session of its own; ``seen["retry_after"]`` is
        the last response's Retry-After (the library drops an error response's headers)."""
        session = self.config.session(isolation_key)
        seen: dict = {"retry_after": None}

        def remember(response, *args, **kwargs):
            seen["retry_after"] = response.headers.get("Retry-After")

        session.hooks["response"].append(remember)
        net = acme_client.ClientNetwork(self.account_key, alg=jose.ES256,
                                        verify_ssl=self.config.ca_file or True,
                                        user_agent="shroud-acme")
        net.session = session
        directory = acme_client.ClientV2.get_directory(self.config.directory, net)
        return acme_client.ClientV2(directory, net), net, seen

    def _account(self, acme, net) -> None:
        reg = messages.NewRegistration.from_data(email=self.config.email,
                                                 terms_of_service_agreed=True)
        try:
            net.account = _retry_nonce(acme.new_account, reg)
        except errors.ConflictError as e:  # this key's account exists: use it
            net.account = messages.RegistrationResource(uri=e.location,
                                                        body=messages.Registration())

    def obtain(self, name: str) -> bytes:
        """Order, validate and store a certificate for ``name``; its PEM chain."""
        self.orders += 1
        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        log.info("%s: ordering a certificate from %s (order %d)", name, self.config.directory,
                 self.orders)
        try:
            chain = self._order(name, key_pem)
        except errors.ValidationError as e:
            raise AcmeError(_validation_reasons(e)) from None
        except errors.TimeoutError:
            raise AcmeError(f"the CA did not issue within {ORDER_TIMEOUT:.0f} s") from None
        except (errors.Error, OSError, ValueError) as e:  # requests' errors are OSErrors
            raise AcmeError(f"{type(e).__name__}: {e}") from None
        finally:
            self.book.remove_challenge(name)
        self._store(name, chain, key_pem)
        log.info("%s: certificate issued, valid until %s (renewal due %s)", name,
                 x509.load_pem_x509_certificate(chain).not_valid_after_utc.isoformat(),
                 _when(renewal_due(chain)))
        return chain

    def _order(self, name: str, key_pem: bytes) -> bytes:
        # Each order on its own Tor circuit (the isolation key), docs/SECURITY.md.
        acme, net, seen = self._client(f"acme-order-{name}-{time.time_ns()}")
        try:
            return self._steps(acme, net, name, key_pem)
        except messages.Error as e:
            raise explain_error(e, seen["retry_after"]) from None

    def _steps(self, acme, net, name: str, key_pem: bytes) -> bytes:
        self._account(acme, net)
        order = _retry_nonce(acme.new_order, crypto_util.make_csr(key_pem, [name]))
        for authz in order.authorizations:
            if authz.body.status == messages.STATUS_VALID:
                continue
            challb = _tls_alpn_challenge(authz)
            response = challb.chall.response(self.account_key)
            cert_pem, ckey_pem = challenge_certificate(name, response.key_authorization)
            self.book.add_challenge(name, cert_pem, ckey_pem)
            _retry_nonce(acme.answer_challenge, challb, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
        order = _retry_nonce(acme.poll_authorizations, order, deadline)
        self.book.remove_challenge(name)
        order = _retry_nonce(acme.begin_finalization, order)
        order = _retry_nonce(acme.poll_finalization, order, deadline)
        return order.fullchain_pem.encode()


def explain_error(e: messages.Error, retry_after: str | None) -> AcmeError:
    """One line for an ACME problem document; ``retry_after`` is the Retry-After header of
    the response that carried it (rateLimited: when to try again, RFC 8555 section 6.6)."""
    if e.code == "rateLimited":
        when = _parse_retry_after(retry_after)
        return AcmeError(f"rate limited by the CA: {e.detail}; retry after "
                         f"{_when(when) if when else 'an hour'}",
                         retry_after=when or time.time() + RETRY_MAX)
    return AcmeError(f"the CA refused: {e.code or e.typ}: {e.detail}")


def _tls_alpn_challenge(authz) -> messages.ChallengeBody:
    for challb in authz.body.challenges:
        if isinstance(challb.chall, TLSALPN01):
            return challb
    offered = ", ".join(c.chall.typ for c in authz.body.challenges)
    raise AcmeError(f"the CA offers no tls-alpn-01 challenge for "
                    f"{authz.body.identifier.value} (only {offered})")


def _validation_reasons(e: errors.ValidationError) -> str:
    reasons = []
    for authzr in e.failed_authzrs:
        for challb in authzr.body.challenges:
            if challb.error is not None:
                reasons.append(f"{authzr.body.identifier.value}: {challb.chall.typ}: "
                               f"{challb.error.detail or challb.error.code}")
    return "validation failed: " + ("; ".join(reasons) or "the CA gave no reason")


def _parse_retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return time.time() + int(value)
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


def _when(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M:%S UTC")


def requests_session(socks: tuple[str, int] | None, isolation_key: str):
    """A requests session, through the SOCKS5 server ``socks`` (tor's) with credentials of its
    own for ``isolation_key`` (tor's IsolateSOCKSAuth: a circuit per key), or direct."""
    import requests

    session = requests.Session()
    session.trust_env = False  # an http(s)_proxy variable must not route around Tor
    if socks is not None:
        # The key itself is the SOCKS user name (no ':' or '@': urllib3 splits the URL's user
        # part at the first ':' and does not unquote); tor isolates by user and password.
        user = "shroud-" + "".join(c if c.isalnum() or c in ".-_" else "_"
                                   for c in isolation_key)[:200]
        url = f"socks5h://{user}:shroud@{socks[0]}:{socks[1]}"
        session.proxies = {"https": url, "http": url}
    return session
