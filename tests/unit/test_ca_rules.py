"""The CA's decisions as pure logic: tokens, the node rule, CSR checks, lifetimes."""
from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ambit.agent.discovery.model import PodInfo
from ambit.agent.identity.csr import certificate_request, new_workload_key
from ambit.agent.identity.spiffe import SpiffeId
from ambit.ca.authn import Caller, Unauthenticated, bearer_token, caller_from_review, parse_token_file
from ambit.ca.authz import (
    INVALID_ARGUMENT,
    PERMISSION_DENIED,
    Refused,
    caller_node,
    check_csr_identity,
    check_scheduled_on,
    parse_accounts,
    wanted_identity,
)
from ambit.ca.csr import InvalidCsr, read_csr
from ambit.ca.service import IssuingPolicy

TD = "cluster.local"
NODE_AGENTS = frozenset({"ambit-system/ambit-node"})
AGENT = Caller("ambit-system", "ambit-node", pod_name="ambit-node-a", pod_uid="u-a", node_name="node1",
               source="tokenreview")
AGENT_POD = PodInfo("ambit-system", "ambit-node-a", uid="u-a", service_account="ambit-node", node_name="node1")
CART = SpiffeId(TD, "shop", "cart")


def refusal(call) -> Refused:  # type: ignore[no-untyped-def]
    with pytest.raises(Refused) as caught:
        call()
    return caught.value


# -- tokens -----------------------------------------------------------------------


def test_bearer_token_must_be_one_bearer_header() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("Authorization", b"bearer  abc ")]) == "abc"
    for metadata, why in [([], "no authorization"), ([("authorization", "Basic x")], "not a bearer"),
                          ([("authorization", "Bearer ")], "not a bearer"),
                          ([("authorization", "Bearer a"), ("authorization", "Bearer b")], "more than one"),
                          ([("authorization", "Bearer " + "x" * 20000)], "longer")]:
        with pytest.raises(Unauthenticated, match=why):
            bearer_token(metadata)


def review(**user: object) -> dict:
    base = {"username": "system:serviceaccount:ambit-system:ambit-node",
            "groups": ["system:serviceaccounts", "system:serviceaccounts:ambit-system", "system:authenticated"],
            "extra": {"authentication.kubernetes.io/pod-name": ["ambit-node-a"],
                      "authentication.kubernetes.io/pod-uid": ["u-a"],
                      "authentication.kubernetes.io/node-name": ["node1"]}}
    base.update(user)
    return {"status": {"authenticated": True, "user": base}}


def test_a_token_review_gives_the_account_and_its_pod() -> None:
    assert caller_from_review(review()) == AGENT
    bare = caller_from_review(review(extra={}))
    assert (bare.pod_name, bare.node_name) == ("", "")


@pytest.mark.parametrize("answer, why", [
    ({"status": {"authenticated": False, "error": "token expired"}}, "token expired"),
    ({"status": {"authenticated": False}}, "did not authenticate"),
    ({}, "did not authenticate"),
    (review(groups=["system:authenticated"]), "not a service account"),
    (review(username="alice"), "not a service account"),
    (review(username="system:serviceaccount:only-one"), "NAMESPACE:NAME"),
])
def test_token_reviews_that_authenticate_no_service_account(answer: dict, why: str) -> None:
    with pytest.raises(Unauthenticated, match=why):
        caller_from_review(answer)


def test_token_file_lines() -> None:
    callers = parse_token_file("# comment\n\nt1,ambit-system/ambit-node,node1\n t2 , shop/waypoint , node2\n")
    assert callers["t1"] == Caller("ambit-system", "ambit-node", node_name="node1", source="token-file")
    assert callers["t2"].account == "shop/waypoint" and callers["t2"].node_name == "node2"
    for bad in ["t1,ambit-node,node1", "t1,a/b", "t1,a/b,", "t1,a/b,n\nt1,c/d,n"]:
        with pytest.raises(ValueError):
            parse_token_file(bad)


# -- which identity, which node ------------------------------------------------------


def test_callers_get_their_own_identity_and_only_node_agents_impersonate() -> None:
    cart = Caller("shop", "cart", pod_name="cart-1")
    assert wanted_identity(cart, "", TD, NODE_AGENTS).identity == CART
    assert wanted_identity(AGENT, str(CART), TD, NODE_AGENTS).impersonating
    assert refusal(lambda: wanted_identity(cart, str(CART), TD, NODE_AGENTS)).reason == "not-a-node-proxy"
    assert refusal(lambda: wanted_identity(AGENT, "spiffe://cluster.local/ns/a", TD, NODE_AGENTS)).code == \
        INVALID_ARGUMENT
    assert refusal(lambda: wanted_identity(AGENT, "spiffe://other.td/ns/shop/sa/cart", TD,
                                           NODE_AGENTS)).reason == "foreign-trust-domain"


def test_the_node_comes_from_the_callers_own_pod() -> None:
    assert caller_node(AGENT, AGENT_POD) == "node1"
    cases = [
        (AGENT, None, "caller-pod-unknown"),
        (AGENT, PodInfo("ambit-system", "ambit-node-a", uid="other", service_account="ambit-node",
                        node_name="node1"), "caller-pod-replaced"),
        (AGENT, PodInfo("ambit-system", "ambit-node-a", uid="u-a", service_account="default", node_name="node1"),
         "caller-pod-account"),
        (AGENT, PodInfo("ambit-system", "ambit-node-a", uid="u-a", service_account="ambit-node"),
         "caller-pod-unscheduled"),
        # The token was minted on node1, the pod (same uid) is on node2 now: neither is believed.
        (AGENT, PodInfo("ambit-system", "ambit-node-a", uid="u-a", service_account="ambit-node", node_name="node2"),
         "caller-node-mismatch"),
        # A token bound to no pod says nothing about a node, even if someone wrote one in.
        (Caller("ambit-system", "ambit-node", node_name="node1", source="tokenreview"), None,
         "token-not-bound-to-a-pod"),
    ]
    for caller, pod, reason in cases:
        refused = refusal(lambda: caller_node(caller, pod))
        assert (refused.code, refused.reason) == (PERMISSION_DENIED, reason)
    # The operator's token file binds its tokens to a node.
    assert caller_node(Caller("ambit-system", "ambit-node", node_name="node3", source="token-file"), None) == "node3"


def test_an_identity_needs_a_running_pod_on_that_node() -> None:
    pods = [PodInfo("shop", "cart-1", service_account="cart", node_name="node1"),
            PodInfo("shop", "web-1", service_account="web", node_name="node2"),
            PodInfo("shop", "job-1", service_account="job", node_name="node1", phase="Failed")]
    assert check_scheduled_on(CART, "node1", pods).name == "cart-1"
    for identity, node in [(CART, "node2"), (SpiffeId(TD, "shop", "web"), "node1"), (SpiffeId(TD, "shop", "job"),
                                                                                     "node1"),
                           (SpiffeId(TD, "other", "cart"), "node1")]:
        assert refusal(lambda: check_scheduled_on(identity, node, pods)).reason == "identity-not-on-node"
    assert refusal(lambda: check_csr_identity(SpiffeId(TD, "shop", "web"), CART)).code == INVALID_ARGUMENT


def test_trusted_node_accounts_in_istiods_form() -> None:
    assert parse_accounts("ambit-system/ambit-node, istio-system/ztunnel,") == {
        "ambit-system/ambit-node", "istio-system/ztunnel"}
    for bad in ["ztunnel", "a/", "/b", "a/b/c"]:
        with pytest.raises(ValueError):
            parse_accounts(bad)


def test_lifetimes_default_and_cap() -> None:
    policy = IssuingPolicy(frozenset(), default_ttl=timedelta(hours=24), max_ttl=timedelta(hours=48))
    assert policy.lifetime(0) == (timedelta(hours=24), False)
    assert policy.lifetime(-5) == (timedelta(hours=24), False)
    assert policy.lifetime(3600) == (timedelta(hours=1), False)
    assert policy.lifetime(7 * 86400) == (timedelta(hours=48), True)
    assert policy.lifetime(2**63 - 1) == (timedelta(hours=48), True)


# -- CSRs ------------------------------------------------------------------------------


def csr_with(names: list[x509.GeneralName] | None, key=None) -> str:  # type: ignore[no-untyped-def]
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_the_agents_csr_is_accepted() -> None:
    key = new_workload_key()
    request = read_csr(certificate_request(CART, key))
    assert request.identity == CART
    assert request.public_key.public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize("csr, why", [
    ("", "no CSR"),
    ("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "not a PEM"),
    (csr_with(None), "no subjectAltName"),
    (csr_with([x509.UniformResourceIdentifier(str(CART)), x509.DNSName("cart.shop.svc")]), "cart.shop.svc"),
    (csr_with([x509.UniformResourceIdentifier(str(CART)),
               x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/web")]), "2 URIs"),
    (csr_with([x509.UniformResourceIdentifier("https://cart.example")]), "not a workload SPIFFE ID"),
    (csr_with([x509.UniformResourceIdentifier(str(CART))], rsa.generate_private_key(65537, 1024)), "too small"),
    (csr_with([x509.UniformResourceIdentifier(str(CART))], ec.generate_private_key(ec.SECP256K1())),
     "not allowed"),
    ("x" * 20000, "larger than"),
])
def test_csrs_the_ca_will_not_sign(csr: str, why: str) -> None:
    with pytest.raises(InvalidCsr, match=why):
        read_csr(csr)


def test_a_csr_signed_by_another_key_is_refused() -> None:
    good = certificate_request(CART, new_workload_key())
    other = certificate_request(CART, new_workload_key())
    # The first CSR's body with the second's signature: possession is not proven.
    body = x509.load_pem_x509_csr(good.encode())
    forged_der = body.tbs_certrequest_bytes
    tampered = x509.load_pem_x509_csr(other.encode()).public_bytes(serialization.Encoding.DER)
    assert forged_der not in tampered
    mixed = tampered.replace(x509.load_pem_x509_csr(other.encode()).tbs_certrequest_bytes, forged_der)
    pem = "-----BEGIN CERTIFICATE REQUEST-----\n" + __import__("base64").encodebytes(mixed).decode() + \
          "-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(InvalidCsr, match="signature"):
        read_csr(pem)
