"""Who gets in: API keys kept as hashes (gRPC metadata and HTTP Bearer), the per-key rate limit, and mTLS between
the services, against real processes: an image encoder and the LLM service that require client certificates,
and a gateway that presents one.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from procs import Procs, free_port, http_chat, record_figures, wait_grpc, wait_triton

from modalink.auth import KeyRing, RateLimiter, hash_key, key_from_headers
from modalink.config import Settings
from modalink.errors import ConfigError
from modalink.wire import assistant_pb2, common_pb2, llm_pb2

MODALINK = [sys.executable, "-m", "modalink.cli"]
HASHED_KEY, PLAIN_KEY = "mlk_hashed-at-rest", "mlk_plain-in-env"
ADMIN_KEY = "mlk_admin-may-promote"


def make_certs(out: Path) -> dict[str, Path]:
    """A CA and one certificate for the services (server and client use, SAN 127.0.0.1/localhost), and a
    certificate from another CA that the services must refuse."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, key, cert) -> None:
        (out / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
        (out / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def ca(cn: str):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(key, hashes.SHA256()))  # fmt: skip
        return key, cert

    def leaf(cn: str, issuer_key, issuer_cert):
        key = ec.generate_private_key(ec.SECP256R1())
        san = x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        )
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer_cert.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(san, critical=False).add_extension(eku, critical=False)
                .sign(issuer_key, hashes.SHA256()))  # fmt: skip
        return key, cert

    ca_key, ca_cert = ca("modalink test CA")
    write("ca", ca_key, ca_cert)
    write("service", *leaf("modalink-service", ca_key, ca_cert))
    rogue_key, rogue_cert = ca("someone else's CA")
    write("rogue", *leaf("intruder", rogue_key, rogue_cert))
    return {stem: out / f"{stem}.pem" for stem in ("ca", "service", "rogue")} | {
        f"{stem}_key": out / f"{stem}.key" for stem in ("service", "rogue")
    }


@pytest.fixture(scope="module")
def secured(tmp_path_factory, samples):
    certs = make_certs(tmp_path_factory.mktemp("certs"))
    adapters = tmp_path_factory.mktemp("registry") / "adapters"  # a copy: the tests promote versions
    shutil.copytree(Settings().adapters_dir, adapters)
    tls = {"MODALINK_TLS_CERT": str(certs["service"]), "MODALINK_TLS_KEY": str(certs["service_key"]),
           "MODALINK_TLS_CA": str(certs["ca"])}  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MODALINK_NUM_THREADS": "1", "MODALINK_QUANTIZE": "fp16-cpu",
           "MODALINK_ADAPTERS_DIR": str(adapters), **tls}  # fmt: skip
    procs = Procs(tmp_path_factory.mktemp("logs"), env)
    try:
        http, grpc_port, metrics = free_port(), free_port(), free_port()
        ports = ["--http-port", str(http), "--grpc-port", str(grpc_port), "--metrics-port", str(metrics)]
        encoder = procs.start("image", [*MODALINK, "serve", "encoder", "-m", "image", *ports, "--host", "127.0.0.1"])
        llm_port, gw_port, gw_http = free_port(), free_port(), free_port()
        llm = procs.start("llm", [*MODALINK, "serve", "llm", "--port", str(llm_port), "--http-port", "0"])
        gateway = procs.start(
            "gateway", [*MODALINK, "serve", "gateway", "--port", str(gw_port), "--http-port", str(gw_http)],
            {"MODALINK_ENCODERS": f"image=127.0.0.1:{grpc_port}", "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
             "MODALINK_API_KEY_HASHES": hash_key(HASHED_KEY), "MODALINK_API_KEYS": PLAIN_KEY,
             "MODALINK_ADMIN_API_KEY_HASHES": hash_key(ADMIN_KEY),
             "MODALINK_RATE_LIMIT_RPS": "1", "MODALINK_RATE_LIMIT_BURST": "4"},
        )  # fmt: skip
        # a gateway whose rate limit refills so slowly (1 request per 1000 s) that no test can take long enough to
        # see a refill: what it lets through is a count, not a matter of timing
        lim_port, lim_http = free_port(), free_port()
        limited = procs.start(
            "limited", [*MODALINK, "serve", "gateway", "--port", str(lim_port), "--http-port", str(lim_http)],
            {"MODALINK_ENCODERS": f"image=127.0.0.1:{grpc_port}", "MODALINK_LLM_ADDRESS": f"127.0.0.1:{llm_port}",
             "MODALINK_API_KEY_HASHES": hash_key(HASHED_KEY), "MODALINK_API_KEYS": PLAIN_KEY,
             "MODALINK_RATE_LIMIT_RPS": "0.001", "MODALINK_RATE_LIMIT_BURST": "3"},
        )  # fmt: skip
        wait_triton(http, "image_encoder", *encoder)
        wait_llm_tls(f"127.0.0.1:{llm_port}", certs, *llm)
        wait_grpc(f"127.0.0.1:{gw_port}", *gateway)  # the gateway's own port is plain (behind the ingress's TLS)
        wait_grpc(f"127.0.0.1:{lim_port}", *limited)
        yield {"certs": certs, "encoder": f"127.0.0.1:{grpc_port}", "llm": f"127.0.0.1:{llm_port}",
               "gateway": f"127.0.0.1:{gw_port}", "http": f"http://127.0.0.1:{gw_http}",
               "limited": f"127.0.0.1:{lim_port}", "limited_http": f"http://127.0.0.1:{lim_http}",
               "image": Path(samples["image"]).read_bytes()}  # fmt: skip
    finally:
        procs.stop_all()


def tls_channel(address: str, certs: dict, client: str | None = "service") -> grpc.Channel:
    creds = grpc.ssl_channel_credentials(certs["ca"].read_bytes(),
                                         certs[f"{client}_key"].read_bytes() if client else None,
                                         certs[client].read_bytes() if client else None)  # fmt: skip
    return grpc.secure_channel(address, creds)


def wait_llm_tls(address: str, certs: dict, proc, log, timeout: float = 180) -> None:
    from modalink.v1 import llm_pb2_grpc

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llm exited:\n{log.read_text()[-3000:]}")
        with tls_channel(address, certs) as ch:
            try:
                llm_pb2_grpc.LLMStub(ch).Info(llm_pb2.InfoRequest(), timeout=2)
                return
            except grpc.RpcError:
                time.sleep(0.5)
    raise TimeoutError(f"llm not up:\n{log.read_text()[-3000:]}")


def embed(address: str, image: bytes, metadata=()) -> assistant_pb2.EmbedResponse:
    from modalink.v1 import assistant_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        part = common_pb2.Part(image=common_pb2.Image(data=image))
        return assistant_pb2_grpc.AssistantStub(ch).Embed(assistant_pb2.EmbedRequest(part=part), timeout=60,
                                                          metadata=metadata)  # fmt: skip


def test_key_ring_keeps_only_hashes_and_reads_both_headers():
    ring = KeyRing(keys=["k-plain"], hashes=[hash_key("k-hashed")])
    assert all(h.startswith("sha256:") and "k-" not in h for h in ring.hashes)
    assert (
        ring.identify("k-plain") and ring.identify("k-hashed") and ring.identify("k-plain") != ring.identify("k-hashed")
    )
    assert ring.identify("k-other") is None and ring.identify("") is None and ring.identify(None) is None
    assert key_from_headers({"authorization": "Bearer abc"}) == "abc" == key_from_headers({"x-api-key": "abc"})
    assert key_from_headers({"authorization": "Basic abc"}) is None
    with pytest.raises(ConfigError, match="sha256:<64"):
        KeyRing(hashes=["sha256:not-hex"])


def test_admin_keys_are_accepted_keys_and_the_only_ones_that_may_promote():
    settings = Settings(api_keys="k-plain", api_key_hashes=hash_key("k-hashed"), admin_api_keys="k-admin",
                        admin_api_key_hashes=hash_key("k-admin-hashed"))  # fmt: skip
    keys, admins = KeyRing.from_settings(settings), KeyRing.admins_from_settings(settings)
    assert all(keys.identify(k) for k in ("k-plain", "k-hashed", "k-admin", "k-admin-hashed"))
    assert admins.identify("k-admin") and admins.identify("k-admin-hashed")
    assert admins.identify("k-plain") is None and admins.identify("k-hashed") is None
    assert not KeyRing.admins_from_settings(Settings(api_keys="k-plain"))  # no admins: nobody promotes
    with pytest.raises(ConfigError, match="sha256:<64"):
        KeyRing.from_settings(Settings(admin_api_key_hashes="sha256:nope"))


def test_rate_limiter_allows_the_burst_then_the_rate():
    now = [100.0]  # a clock the test moves: counts and order, not wall time
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)  # empty: one token comes back every 1/rate s
    assert limiter.acquire("b") == 0.0  # another key has its own bucket
    now[0] += 0.25
    assert limiter.acquire("a") == pytest.approx(0.25)  # half a token back: still refused, and not counted
    now[0] += 0.25
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.5)
    now[0] += 60  # a long pause refills to the burst, no more
    assert [limiter.acquire("a") for _ in range(4)] == [0.0, 0.0, 0.0, pytest.approx(0.5)]


def test_grpc_needs_a_key_as_metadata_or_bearer(secured):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    for metadata in [(), (("x-api-key", "wrong"),), (("authorization", f"Bearer {hash_key(HASHED_KEY)}"),)]:
        with pytest.raises(grpc.RpcError) as err:  # the hash itself is not a key
            embed(secured["gateway"], secured["image"], metadata)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.value.details()
    # the embeddings come from the encoder over mTLS: the gateway presented its certificate
    assert embed(secured["gateway"], secured["image"], (("x-api-key", HASHED_KEY),)).embeddings.shape == [8, 576]
    res = embed(secured["gateway"], secured["image"], (("authorization", f"Bearer {PLAIN_KEY}"),))
    assert res.embeddings.shape == [8, 576]
    with grpc.insecure_channel(secured["gateway"]) as ch:  # probes need no key
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1


def test_http_needs_a_bearer_key_and_generates_over_mtls(secured):
    status, _, body = http_chat(secured["http"])
    assert status == 401 and "API key" in body
    status, _, body = http_chat(secured["http"], HASHED_KEY)  # the LLM service is reached over mTLS
    assert status == 200 and '"choices"' in body, body


def test_rate_limit_per_key(secured):
    """Burst 3, then (almost) nothing: a key's fourth call is turned away with a retry hint, on gRPC and on HTTP
    (each port has its buckets), and another key is not. Counts, not timing: the refill (1 per 1000 s) cannot
    let a call through however slow this machine is."""
    codes, retry_after = [], None
    for _ in range(6):
        try:
            embed(secured["limited"], secured["image"], (("x-api-key", PLAIN_KEY),))
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
            if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                retry_after = dict(e.trailing_metadata() or ()).get("retry-after")
                assert "rate limit" in e.details() and "retry in" in e.details()
    assert codes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 3, codes
    assert retry_after and 0 < float(retry_after) <= 1000
    assert embed(secured["limited"], secured["image"], (("x-api-key", HASHED_KEY),))  # its own bucket
    statuses = []
    for _ in range(5):
        req = urllib.request.Request(secured["limited_http"] + "/v1/models", headers={"x-api-key": PLAIN_KEY})
        try:
            with urllib.request.urlopen(req, timeout=30) as res:
                statuses.append((res.status, dict(res.headers)))
        except urllib.error.HTTPError as e:
            statuses.append((e.code, {k.lower(): v for k, v in e.headers.items()}))
    assert [s for s, _ in statuses] == [200] * 3 + [429] * 2, [s for s, _ in statuses]
    assert all(int(h["retry-after"]) >= 1 for s, h in statuses if s == 429)
    record_figures("rate_limit", grpc_calls=len(codes), grpc_refused=codes.count("RESOURCE_EXHAUSTED"),
                   http_calls=len(statuses), http_refused=[s for s, _ in statuses].count(429))  # fmt: skip


def test_internal_services_refuse_clients_without_a_trusted_certificate(secured):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    from modalink.v1 import llm_pb2_grpc

    certs, info = secured["certs"], llm_pb2.InfoRequest()
    refused = []
    for label, ch in [("plaintext", grpc.insecure_channel(secured["llm"])),
                      ("TLS without a client certificate", tls_channel(secured["llm"], certs, None)),
                      ("a certificate from another CA", tls_channel(secured["llm"], certs, "rogue"))]:  # fmt: skip
        with ch, pytest.raises(grpc.RpcError) as err:
            llm_pb2_grpc.LLMStub(ch).Info(info, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (label, err.value)
        refused.append(label)
    with tls_channel(secured["llm"], certs) as ch:
        assert llm_pb2_grpc.LLMStub(ch).Info(info, timeout=10).hidden_size == 576
    # Triton's gRPC port, as the gateway's tritonclient reaches it (modalink.remote): only with a certificate
    # from the services' CA. A TLS client that trusts the server but has no certificate, or one from another CA,
    # is refused at the handshake like a plaintext one.
    ca = {"root_certificates": str(certs["ca"])}
    encoder_clients = [("plaintext", {}), ("TLS without a client certificate", {"ssl": True, **ca}),
                       ("a certificate from another CA", {"ssl": True, **ca, "private_key": str(certs["rogue_key"]),
                                                          "certificate_chain": str(certs["rogue"])})]  # fmt: skip
    refused_encoder = []
    for label, tls in encoder_clients:
        with pytest.raises(InferenceServerException) as err:
            tg.InferenceServerClient(secured["encoder"], **tls).is_server_live(client_timeout=10)
        assert "UNAVAILABLE" in str(err.value.status()), (label, err.value)
        refused_encoder.append(label)
    pem = {"root_certificates": str(certs["ca"]), "private_key": str(certs["service_key"]),
           "certificate_chain": str(certs["service"])}  # fmt: skip
    trusted = tg.InferenceServerClient(secured["encoder"], ssl=True, **pem)
    assert trusted.is_model_ready("image_encoder", client_timeout=10)
    record_figures("mtls", refused_llm_clients=refused, refused_encoder_clients=refused_encoder)


def patient(fn, *args, **kw):
    """``fn`` retried while this gateway's rate limit (1 request/s) turns it away, as a client should."""
    for _ in range(20):
        try:
            return fn(*args, **kw)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            time.sleep(float(dict(e.trailing_metadata())["retry-after"]) + 0.05)
    raise AssertionError("still rate limited")


def test_promote_and_rollback_with_an_admin_key_reach_the_encoder(secured):
    """The adapters page's calls: an admin key's holder promotes an older image adapter, the encoder serves it
    without a restart, and a rollback brings the newer one back. An ordinary key may list the adapters but not
    promote (PERMISSION_DENIED); without a valid key, nothing at all."""
    from modalink import client

    with client.Client(secured["gateway"], api_key=ADMIN_KEY) as c:
        table = patient(c.adapters, "image")["image"]
        newest, older = table["versions"][-1]["version"], table["versions"][0]["version"]
        assert table["current"] == newest and older != newest
        with client.Client(secured["gateway"], api_key="wrong") as intruder, pytest.raises(grpc.RpcError) as err:
            intruder.promote("image", older)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in (HASHED_KEY, PLAIN_KEY):
            with client.Client(secured["gateway"], api_key=key) as ordinary:
                assert patient(ordinary.adapters, "image")["image"]["current"] == newest
                with pytest.raises(grpc.RpcError) as err:
                    patient(ordinary.promote, "image", older)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
                assert "admin API key" in err.value.details()
                with pytest.raises(grpc.RpcError) as err:
                    patient(ordinary.promote, "image", rollback=True)
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert patient(c.adapters, "image")["image"]["current"] == newest  # nothing changed
        assert embed(secured["gateway"], secured["image"], (("x-api-key", ADMIN_KEY),)).embeddings.shape == [8, 576]
        assert patient(c.promote, "image", older)["image"]["current"] == older

        def served() -> str:
            return patient(embed, secured["gateway"], secured["image"], (("x-api-key", HASHED_KEY),)).adapter_version

        deadline = time.time() + 30
        while served() != older and time.time() < deadline:  # the encoder checks CURRENT between batches
            time.sleep(0.5)
        assert served() == older
        with pytest.raises(grpc.RpcError) as err:
            patient(c.promote, "image", "v999")
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "v999" in err.value.details()
        assert patient(c.promote, "image", rollback=True)["image"]["current"] == newest
