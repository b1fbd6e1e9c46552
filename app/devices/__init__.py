"""Devices: inventory, discovery (mDNS, manual), SSH trust, remote operations, profiles, preflight."""
