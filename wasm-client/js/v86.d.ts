// Types of js/v86.js: a v86 network adapter on a webnic session.
import type { PacketNic, PacketOptions } from './packets.js';

/** The part of v86's bus (`emulator.bus`) the adapter uses. */
export interface V86Bus {
  register(name: string, fn: (data: Uint8Array) => void, thisValue?: unknown): void;
  unregister(name: string, fn: (data: Uint8Array) => void): void;
  send(name: string, value: unknown): void;
}

export interface WebnicV86Options extends PacketOptions {
  /** v86's network id: the adapter listens on `net{id}-send` (default 0). */
  id?: number;
  /** Log lines: the guest's MAC, every DHCP exchange, the guest's IPv6 address. */
  onEvent?: (line: string) => void;
}

/** Gives a v86 guest's NIC (ne2k or virtio) a webnic session: DHCP, ARP, IPv6 RA, and its IP traffic. */
export class WebnicV86Adapter {
  /** Opens a raw-packet session to `url` and attaches it to `bus`. */
  static connect(bus: V86Bus, url: string, options?: WebnicV86Options): Promise<WebnicV86Adapter>;
  constructor(bus: V86Bus, nic: PacketNic, options?: WebnicV86Options);
  /** The session: addresses, MTU, resolvers, `closed`. */
  readonly nic: PacketNic;
  /** Counters of the adapter (frames, packets, replies, drops by reason, queue drops). */
  stats(): {
    framesFromGuest: number;
    packetsToSession: number;
    packetsToGuest: number;
    arpReplies: number;
    dhcpReplies: number;
    ndiscReplies: number;
    dropped: Record<string, number>;
    queueDrops: number;
  };
  /** Detaches from the bus and ends the session. */
  destroy(): void;
}

export default WebnicV86Adapter;
