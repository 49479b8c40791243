"""cni/wire.py against the classes generated from agent.proto: every message
the plugin sends must serialize byte for byte like protobuf's, and every
reply it reads must decode from protobuf's bytes."""
from __future__ import annotations

import pytest

from ambit.api.v1 import agent_pb2 as pb
from ambit.cni import wire

ATT = pb.Attachment(container_id="0123abcd" * 8, ifname="eth0")
POD = pb.PodRef(namespace="shop", name="web-0", uid="5f0c-é")


@pytest.mark.parametrize("ips", [[], ["10.0.0.5/24"], ["10.0.0.5/24", "fd00::5/64"]])
def test_enrol_request_matches_protobuf(ips):
    expected = pb.EnrolPodRequest(attachment=ATT, netns="/var/run/netns/x", pod=POD, ips=ips, network="kind")
    got = wire.enrol_pod_request(wire.attachment(ATT.container_id, ATT.ifname), "/var/run/netns/x",
                                 wire.pod_ref(POD.namespace, POD.name, POD.uid), ips, "kind")
    assert got == expected.SerializeToString()


def test_release_check_and_gc_requests_match_protobuf():
    att = wire.attachment(ATT.container_id, ATT.ifname)
    pod = wire.pod_ref(POD.namespace, POD.name, POD.uid)
    assert wire.release_pod_request(att, "", pod) == \
        pb.ReleasePodRequest(attachment=ATT, pod=POD).SerializeToString()
    assert wire.check_pod_request(att, "/ns", pod, ["10.1.1.1/32"]) == \
        pb.CheckPodRequest(attachment=ATT, netns="/ns", pod=POD, ips=["10.1.1.1/32"]).SerializeToString()
    valid = [pb.Attachment(container_id="a", ifname="eth0"), pb.Attachment(container_id="b", ifname="net1")]
    assert wire.garbage_collect_request([wire.attachment("a", "eth0"), wire.attachment("b", "net1")], "n") == \
        pb.GarbageCollectRequest(valid=valid, network="n").SerializeToString()


def test_empty_fields_are_omitted_like_proto3():
    # an empty nested message is still present (field 4, length 0)
    assert wire.encode([(1, ""), (2, False), (3, 0), (4, [])]) == b"\x22\x00"


@pytest.mark.parametrize("enrolled", [True, False])
def test_enrol_response_decodes(enrolled):
    reply = pb.EnrolPodResponse(enrolled=enrolled, reason="why not",
                                workload=pb.Workload(attachment=ATT, host_veth="veth1234", host_veth_ifindex=7,
                                                     enrolled_at=1.25, ips=["10.0.0.5/24"], capture="captured"))
    assert wire.enrol_pod_response(reply.SerializeToString()) == \
        {"enrolled": enrolled, "reason": "why not", "host_veth": "veth1234"}


def test_other_responses_decode():
    assert wire.release_pod_response(pb.ReleasePodResponse(released=True).SerializeToString()) == {"released": True}
    assert wire.release_pod_response(b"") == {"released": False}
    assert wire.plugin_status_response(pb.PluginStatusResponse(ready=False, reason="compiling").SerializeToString()) \
        == {"ready": False, "reason": "compiling"}
    gc = pb.GarbageCollectResponse(released=[pb.Attachment(container_id="c1", ifname="eth0"),
                                             pb.Attachment(container_id="c2", ifname="eth0")])
    assert wire.garbage_collect_response(gc.SerializeToString()) == ["c1", "c2"]


def test_unknown_fields_and_fixed_width_types_are_skipped():
    # AgentStatusResponse carries a double (fixed 64-bit) and extra fields the
    # plugin's decoder does not know: it must skip them, not fail.
    data = pb.AgentStatusResponse(version="1", node="n", started_at=3.5, enrolled=4, ready=True).SerializeToString()
    fields = wire.decode(data)
    assert wire.text(fields, 2) == "n" and wire.flag(fields, 5) is True


@pytest.mark.parametrize("broken", [b"\x0a\x05ab", b"\x80", b"\x0b"])
def test_truncated_or_unsupported_input_is_an_error(broken):
    with pytest.raises(ValueError):
        wire.decode(broken)
