#!/usr/bin/env python3
"""A stand-in for PSI's xrayClient64: same arguments, same reply framing, state in a JSON file
($FAKE_XRAY_STATE). FAKE_XRAY_GARBAGE=1 makes it answer nonsense."""
import json
import os
import sys

path = os.environ["FAKE_XRAY_STATE"]
state = {"hv": False, "v": 0, "c": 0, "fl": 4, "shutters": {"1": False, "3": False}}
if os.path.exists(path):
    state = json.load(open(path))
args = sys.argv[1:]
cmd = args[0] if args else ""
if os.environ.get("FAKE_XRAY_GARBAGE"):
    print("segmentation fault (core dumped)")
    sys.exit(0)
reply = "OK"
if cmd == "getHV":
    reply = "Yes" if state["hv"] else "No"
elif cmd == "HV":
    state["hv"] = args[1] == "on"
elif cmd == "issafe":
    reply = ("No, HV is on" if state["hv"] else "Yes, You may open the door now!")
elif cmd == "getwtime":
    reply = "0"
elif cmd == "getActualV":
    reply = str(int(state["v"] * 1000))
elif cmd == "getActualC":
    reply = str(int(state["c"] * 1000))
elif cmd == "setv":
    state["v"] = float(args[1])
elif cmd == "setc":
    state["c"] = float(args[1])
elif cmd == "shutter":
    state["shutters"][args[1]] = args[2] == "on"
elif cmd.startswith("getshutter"):
    idx = cmd[len("getshutter"):]
    reply = f"Shutter {idx}:{'ON' if state['shutters'].get(idx) else 'OFF'}"
elif cmd == "getfl":
    reply = f"Fl is {state['fl']}"
elif cmd == "movefl":
    names = ["In", "Ti", "Cr", "Fe", "Cu", "Ge", "Zr", "Mo", "Ag", "Sn"]
    state["fl"] = names.index(args[1])
elif cmd == "unlock":
    pass
else:
    reply = "Unknown command"
json.dump(state, open(path, "w"))
print(f" This is XRay Box Client\nserverHostname:mpc2128.psi.ch.\n\n--- Rxd data:{reply}\n"
      "---------------------------------")
