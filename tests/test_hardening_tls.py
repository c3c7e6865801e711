"""Optional TLS between the orchestrator and the internal services, with certificates made here.

A throwaway CA signs a certificate for 127.0.0.1; the verify and draft services present it, the
clients trust only that CA. Plaintext clients and clients trusting another CA are refused.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import build_prompt, hf_greedy, png_bytes
from draft_service import server as draft_server
from draft_service.ngram import NgramDrafter
from orchestrator.clients import GrpcDrafter, GrpcVerifier, connect
from orchestrator.loop import speculate
from orchestrator.stopping import StopChecker
from speculum.config import SamplingParams, SpeculationParams
from speculum.errors import Unavailable
from speculum.rpc.settings import ClientSettings, ServerSettings, SessionSettings, TlsServerSettings
from verify_service import server as verify_server


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def make_ca(folder: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name)).issuer_name(_name(name)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert, _pem(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))


def make_server_cert(folder: Path, ca_key, ca_cert: x509.Certificate) -> TlsServerSettings:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("speculum-service")).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return TlsServerSettings(cert_path=_pem(folder / "server.pem", cert.public_bytes(serialization.Encoding.PEM)),
                             key_path=_pem(folder / "server.key", key_pem))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert, ca_path = make_ca(folder, "speculum-ca")
    _, _, other_ca_path = make_ca(folder, "other-ca")
    return make_server_cert(folder, ca_key, ca_cert), ca_path, other_ca_path


@pytest.fixture(scope="module")
def tls_services(llava_engine, pki):
    server_tls, _, _ = pki
    settings = ServerSettings(port=0, max_workers=4, tls=server_tls)
    verifier = verify_server.serve(llava_engine.target, settings, SessionSettings())
    drafter = draft_server.serve(NgramDrafter(), settings, SessionSettings())
    yield verifier, drafter
    verifier.stop()
    drafter.stop()


def test_greedy_over_tls_equals_the_target(llava_engine, tls_services, pki):
    verifier, drafter = tls_services
    clients = ClientSettings(tls_ca_path=pki[1])
    prompt = build_prompt(llava_engine, "Describe the image.", [png_bytes(9)])
    chunks = list(speculate(prompt, SamplingParams(max_new_tokens=32), SpeculationParams(),
                            GrpcVerifier(connect(verifier.address, clients)),
                            GrpcDrafter(connect(drafter.address, clients)), StopChecker(32, frozenset())))
    assert [t for c in chunks for t in c.token_ids] == hf_greedy(llava_engine.target, prompt, 32)
    assert chunks[-1].stats.draft_tokens > 0  # the drafter answered over TLS too


@pytest.mark.parametrize("client", ["plaintext", "other CA"])
def test_untrusted_clients_are_refused(llava_engine, tls_services, pki, client):
    verifier, _ = tls_services
    clients = ClientSettings() if client == "plaintext" else ClientSettings(tls_ca_path=pki[2])
    session = GrpcVerifier(connect(verifier.address, clients), timeout_s=5).open(SamplingParams(seed=1))
    with pytest.raises(Unavailable):
        session.prefill(build_prompt(llava_engine, "Hi"))
    assert len(verifier.servicer.sessions) == 0


def test_tls_settings_from_the_environment(monkeypatch, pki):
    server_tls, ca_path, _ = pki
    monkeypatch.setenv("SPECULUM_TLS_CERT", server_tls.cert_path)
    monkeypatch.setenv("SPECULUM_TLS_KEY", server_tls.key_path)
    monkeypatch.setenv("SPECULUM_TLS_CA", ca_path)
    assert ServerSettings.from_env("VERIFY").tls == server_tls
    assert ClientSettings.from_env().tls_ca_path == ca_path
    monkeypatch.delenv("SPECULUM_TLS_KEY")
    with pytest.raises(ValueError, match="both"):
        ServerSettings.from_env("VERIFY")
    monkeypatch.delenv("SPECULUM_TLS_CERT")
    assert ServerSettings.from_env("VERIFY").tls is None  # off by default


def test_plaintext_handshake_error_is_unavailable_not_a_hang(tls_services):
    verifier, _ = tls_services
    channel = grpc.insecure_channel(verifier.address)
    with pytest.raises(grpc.FutureTimeoutError):
        grpc.channel_ready_future(channel).result(timeout=1.0)


def test_tls_front_relays_unary_streaming_reflection_and_statuses(llava_engine, pki):
    """The public API's TLS front (Ray Serve's proxy has no TLS) relays any service unchanged; here
    it fronts a real plaintext draft service: Info and Prefill (unary), Draft (server streaming),
    reflection (bidirectional streaming) and error statuses all pass through."""
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from orchestrator.tls_front import TlsFront
    from speculum.v1 import drafter_pb2, drafter_pb2_grpc

    server_tls, ca_path, _ = pki
    plain = ServerSettings(port=0, max_workers=4)
    verifier = verify_server.serve(llava_engine.target, plain, SessionSettings())
    drafter = draft_server.serve(NgramDrafter(), plain, SessionSettings())
    front = TlsFront(drafter.address, server_tls, port=0).start()
    try:
        address = f"127.0.0.1:{front.port}"
        secure = connect(address, ClientSettings(tls_ca_path=ca_path))
        prompt = build_prompt(llava_engine, "Describe the image.", [png_bytes(9)])
        chunks = list(speculate(prompt, SamplingParams(max_new_tokens=32), SpeculationParams(),
                                GrpcVerifier(connect(verifier.address)), GrpcDrafter(secure),
                                StopChecker(32, frozenset())))
        assert [t for c in chunks for t in c.token_ids] == hf_greedy(llava_engine.target, prompt, 32)
        assert chunks[-1].stats.draft_tokens > 0
        assert len(drafter.servicer.sessions) == 0  # Release went through too

        reflection = reflection_pb2_grpc.ServerReflectionStub(secure)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        assert "speculum.v1.Drafter" in {s.name for s in answer.list_services_response.service}

        with pytest.raises(grpc.RpcError) as caught:
            list(drafter_pb2_grpc.DrafterStub(secure).Draft(drafter_pb2.DraftRequest(session_id="nope", max_tokens=2),
                                                            timeout=10))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in caught.value.details()

        with pytest.raises(grpc.RpcError) as caught:  # plaintext to the TLS port
            drafter_pb2_grpc.DrafterStub(grpc.insecure_channel(address)).Info(drafter_pb2.DrafterInfoRequest(),
                                                                              timeout=2)
        assert caught.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        front.stop()
        verifier.stop()
        drafter.stop()
