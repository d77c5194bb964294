#!/usr/bin/env python3
"""A field device as paho-mqtt (the Eclipse Python client) runs it, for smgate's tests.

Publishes numbered heartbeats `{"n": N}` to `<prefix>/<machine>/dev-<N % instances>/heartbeat`
at QoS 1 (or 2) with a persistent session (clean_session=False in MQTT 3.1.1; clean_start=False
with a session expiry in MQTT 5), reconnecting by itself whenever the gateway goes away and
resending what was not acknowledged, with DUP set, as paho does. When every message is
acknowledged (or --timeout passes) it writes the numbers the gateway acknowledged, one per
line, to --out, and exits 0 if all were acknowledged, 3 otherwise.
"""

import argparse
import sys
import time

import paho.mqtt.client as mqtt


def keep_pubrel_across_failed_reconnects() -> None:
    """paho-mqtt 2.2.0 resets its outgoing messages at every reconnect attempt, before it
    connects. A QoS 2 message whose PUBREC arrived is marked "resend PUBREL" by the first
    reset; if that attempt fails (the gateway is still down), the next reset turns it into
    "publish" again, and paho resends the PUBLISH, without DUP, after the receiver may already
    have released it: a new message to any receiver (MQTT 3.1.1 §4.3.3 forbids resending a
    PUBLISH once PUBREC has arrived). This keeps the mark across resets, so the device script
    behaves as the protocol says; smgate's drill found the bug.
    """
    original = mqtt.Client._messages_reconnect_reset_out

    def reset(self):
        pubrel = [m for m in self._out_messages.values()
                  if m.qos == 2 and m.state == mqtt.mqtt_ms_resend_pubrel]
        original(self)
        if not self._check_clean_session():
            for m in pubrel:
                m.state = mqtt.mqtt_ms_resend_pubrel

    mqtt.Client._messages_reconnect_reset_out = reset


def published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the gateway acknowledged the message. A message published while the gateway
    was away has rc MQTT_ERR_NO_CONN; paho still queues it and sends it after the reconnect,
    but its is_published() raises for that rc, so the flag is read directly then."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return info._published


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--password", help="a zsm_ machine key or zeq_ak_ account key")
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--prefix", default="smgate")
    ap.add_argument("--machine", default="hb")
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--instances", type=int, required=True)
    ap.add_argument("--first", type=int, default=0, help="number of the first message")
    ap.add_argument("--qos", type=int, default=1, choices=[1, 2])
    ap.add_argument("--v5", action="store_true", help="MQTT 5 instead of 3.1.1")
    ap.add_argument("--inflight", type=int, default=100)
    ap.add_argument("--rate", type=float, default=0, help="messages per second (0: as fast as it can)")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    keep_pubrel_across_failed_reconnects()

    if a.v5:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id, protocol=mqtt.MQTTv5)
    else:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id,
                        protocol=mqtt.MQTTv311, clean_session=False)
    if a.password:
        c.username_pw_set(a.machine, a.password)
    c.max_inflight_messages_set(a.inflight)
    c.max_queued_messages_set(0)
    c.reconnect_delay_set(min_delay=0.05, max_delay=0.5)
    connect_kw = {}
    if a.v5:
        from paho.mqtt.properties import Properties
        from paho.mqtt.packettypes import PacketTypes
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        connect_kw = {"clean_start": False, "properties": props}
    deadline = time.monotonic() + a.timeout
    while True:
        try:
            c.connect(a.host, a.port, keepalive=30, **connect_kw)
            break
        except OSError:
            if time.monotonic() > deadline:
                return 2
            time.sleep(0.1)
    c.loop_start()

    sent = []
    gap = 1.0 / a.rate if a.rate > 0 else 0
    for n in range(a.first, a.first + a.total):
        topic = f"{a.prefix}/{a.machine}/dev-{n % a.instances}/heartbeat"
        # Queued by paho while disconnected (QoS > 0) and sent after the reconnect.
        info = c.publish(topic, f'{{"n":{n}}}', qos=a.qos)
        sent.append((n, info))
        if gap:
            time.sleep(gap)
        elif len(sent) % 500 == 0:
            # Keep paho's queue from growing far ahead of the window.
            while sum(1 for _, i in sent[-1000:] if not published(i)) > 2 * a.inflight:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
    while time.monotonic() < deadline and not all(published(i) for _, i in sent):
        time.sleep(0.05)
    acked = [n for n, i in sent if published(i)]
    with open(a.out, "w") as f:
        f.write("".join(f"{n}\n" for n in acked))
    c.disconnect()
    c.loop_stop()
    return 0 if len(acked) == len(sent) else 3


if __name__ == "__main__":
    sys.exit(main())
