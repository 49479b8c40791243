"""Protocol Buffers wire format for the handful of messages the plugin sends
and reads (proto/ambit/api/v1/agent.proto).

Why not the generated classes: importing protobuf and agent_pb2 costs the
plugin ~15 ms of CPU per run (measured), a large share of its budget when
twenty pods start at once. The schema stays in the .proto; the tests encode
and decode every message here against the generated classes, so a change to
the .proto that this module misses fails the build.
"""

# A message is a list of (field number, value) pairs. str/bytes/nested list
# values are length-delimited; bool/int values are varints.
Message = list

_VARINT, _LEN = 0, 2


def _varint(value: int) -> bytes:
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode(message: Message) -> bytes:
    """Serialize; empty strings, False and 0 are skipped as proto3 does."""
    out = bytearray()
    for number, value in message:
        if isinstance(value, bool) or isinstance(value, int):
            if value:
                out += _varint(number << 3 | _VARINT) + _varint(int(value))
            continue
        if isinstance(value, str):
            if not value:
                continue
            payload = value.encode()
        elif isinstance(value, (bytes, bytearray)):
            payload = bytes(value)
        else:
            payload = encode(value)
        out += _varint(number << 3 | _LEN) + _varint(len(payload)) + payload
    return bytes(out)


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def decode(data: bytes) -> dict[int, list[object]]:
    """Parse one level: field number -> list of raw values (int for varints,
    bytes for length-delimited); fixed-width fields are skipped."""
    fields: dict[int, list[object]] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            value, pos = _read_varint(data, pos)
        elif wire_type == _LEN:
            length, pos = _read_varint(data, pos)
            value = data[pos:pos + length]
            if len(value) != length:
                raise ValueError("truncated field")
            pos += length
        elif wire_type == 1:
            pos += 8
            continue
        elif wire_type == 5:
            pos += 4
            continue
        else:
            raise ValueError(f"unsupported wire type {wire_type}")
        fields.setdefault(number, []).append(value)
    return fields


def text(fields: dict[int, list[object]], number: int) -> str:
    values = fields.get(number)
    return values[-1].decode() if values else ""


def flag(fields: dict[int, list[object]], number: int) -> bool:
    values = fields.get(number)
    return bool(values[-1]) if values else False


def nested(fields: dict[int, list[object]], number: int) -> dict[int, list[object]]:
    values = fields.get(number)
    return decode(values[-1]) if values else {}


# -- the agent API's messages (field numbers from agent.proto) -------------

def attachment(container_id: str, ifname: str) -> Message:
    return [(1, container_id), (2, ifname)]


def pod_ref(namespace: str, name: str, uid: str) -> Message:
    return [(1, namespace), (2, name), (3, uid)]


def enrol_pod_request(att: Message, netns: str, pod: Message, ips: list[str], network: str) -> bytes:
    return encode([(1, att), (2, netns), (3, pod), *[(4, ip) for ip in ips], (5, network)])


def release_pod_request(att: Message, netns: str, pod: Message) -> bytes:
    return encode([(1, att), (2, netns), (3, pod)])


def check_pod_request(att: Message, netns: str, pod: Message, ips: list[str]) -> bytes:
    return encode([(1, att), (2, netns), (3, pod), *[(4, ip) for ip in ips]])


def garbage_collect_request(valid: list[Message], network: str) -> bytes:
    return encode([*[(1, a) for a in valid], (2, network)])


def enrol_pod_response(data: bytes) -> dict[str, object]:
    fields = decode(data)
    workload = nested(fields, 3)
    return {"enrolled": flag(fields, 1), "reason": text(fields, 2), "host_veth": text(workload, 6)}


def release_pod_response(data: bytes) -> dict[str, object]:
    return {"released": flag(decode(data), 1)}


def plugin_status_response(data: bytes) -> dict[str, object]:
    fields = decode(data)
    return {"ready": flag(fields, 1), "reason": text(fields, 2)}


def garbage_collect_response(data: bytes) -> list[str]:
    """Container ids of the released attachments."""
    return [text(decode(raw), 1) for raw in decode(data).get(1, [])]
