"""Sysfs fixture trees that copy the layout of real devices' power sensors.

File names, directory nesting and units follow the kernel drivers (hwmon ina3221 and ina238,
NVIDIA's iio ina3221x on JetPack 4, powercap intel-rapl, power_supply, ACPI power_meter) and
the channel labels are the ones NVIDIA documents per module. The readings themselves are
made-up but plausible values chosen so the expected watts are easy to check by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Link:
    """A symlink (sysfs class directories link into the device tree)."""

    target: str


Tree = Mapping[str, "str | Link"]


def build_tree(root: Path, tree: Tree) -> Path:
    for relative, content in tree.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Link):
            path.symlink_to(content.target)
        else:
            path.write_text(content + "\n", encoding="utf-8")
    return root


def _ina3221_hwmon(base: str, channels: Mapping[int, tuple[str, int, int]]) -> dict[str, str]:
    """Mainline hwmon ina3221: in1-3 bus mV, curr1-3 mA, in4-6 shunt µV, in7 shunt sum."""
    files = {f"{base}/name": "ina3221"}
    shunt_sum = 0
    for k, (label, millivolts, milliamps) in channels.items():
        files[f"{base}/in{k}_label"] = label
        files[f"{base}/in{k}_input"] = str(millivolts)
        files[f"{base}/in{k}_enable"] = "1"
        files[f"{base}/curr{k}_input"] = str(milliamps)
        files[f"{base}/curr{k}_max"] = "32760"
        files[f"{base}/curr{k}_crit"] = "32760"
        files[f"{base}/curr{k}_max_alarm"] = "0"
        files[f"{base}/curr{k}_crit_alarm"] = "0"
        files[f"{base}/shunt{k}_resistor"] = "5000"
        files[f"{base}/in{k + 3}_input"] = str(milliamps * 5)  # µV across 5 mΩ
        shunt_sum += milliamps * 5
    files[f"{base}/in7_label"] = "sum of shunt voltages"
    files[f"{base}/in7_input"] = str(shunt_sum)
    files[f"{base}/curr4_input"] = str(shunt_sum // 5)
    files[f"{base}/curr4_crit"] = "32760"
    files[f"{base}/samples"] = "512"
    files[f"{base}/update_interval"] = "140"
    return files


# Jetson Orin Nano / Orin NX, JetPack 5/6: one INA3221 at 1-0040 on VDD_IN, VDD_CPU_GPU_CV,
# VDD_SOC; /sys/class/hwmon links into the i2c device.
ORIN_NANO: Tree = {
    "firmware/devicetree/base/compatible": "nvidia,p3768-0000+p3767-0005\0nvidia,tegra234",
    "bus/i2c/devices/1-0040/name": "ina3221",
    **_ina3221_hwmon(
        "bus/i2c/devices/1-0040/hwmon/hwmon1",
        {1: ("VDD_IN", 5000, 1500), 2: ("VDD_CPU_GPU_CV", 5000, 400), 3: ("VDD_SOC", 5000, 560)},
    ),
    "class/hwmon/hwmon1": Link("../../bus/i2c/devices/1-0040/hwmon/hwmon1"),
    "class/hwmon/hwmon0/name": "soctherm",
    "class/hwmon/hwmon0/temp1_input": "45500",
}

# Jetson AGX Orin, JetPack 5/6: two INA3221, no module-input channel, "NC" channels on 0x41,
# and a UCSI USB-C port that reports the negotiated contract rather than a measurement.
AGX_ORIN: Tree = {
    "firmware/devicetree/base/compatible": "nvidia,p3737-0000+p3701-0005\0nvidia,tegra234",
    **_ina3221_hwmon(
        "bus/i2c/devices/1-0040/hwmon/hwmon2",
        {
            1: ("VDD_GPU_SOC", 5000, 1200),
            2: ("VDD_CPU_CV", 5000, 600),
            3: ("VIN_SYS_5V0", 5000, 800),
        },
    ),
    **_ina3221_hwmon(
        "bus/i2c/devices/1-0041/hwmon/hwmon3",
        {1: ("NC", 0, 0), 2: ("VDDQ_VDD2_1V8AO", 5000, 200), 3: ("NC", 0, 0)},
    ),
    "class/power_supply/ucsi-source-psy-USBC000:001/type": "USB",
    "class/power_supply/ucsi-source-psy-USBC000:001/online": "1",
    "class/power_supply/ucsi-source-psy-USBC000:001/voltage_now": "20000000",
    "class/power_supply/ucsi-source-psy-USBC000:001/current_now": "3000000",
}


def _ina3221x_iio(base: str, channels: Mapping[int, tuple[str, int, int]]) -> dict[str, str]:
    """NVIDIA's JetPack 4 iio driver: rail_name_K, in_voltageK (mV), in_currentK (mA),
    in_powerK (mW)."""
    files = {f"{base}/name": "ina3221x", f"{base}/running_mode": "1"}
    for k, (label, millivolts, milliamps) in channels.items():
        files[f"{base}/rail_name_{k}"] = label
        files[f"{base}/in_voltage{k}_input"] = str(millivolts)
        files[f"{base}/in_current{k}_input"] = str(milliamps)
        files[f"{base}/in_power{k}_input"] = str(millivolts * milliamps // 1000)
        files[f"{base}/crit_current_limit_{k}"] = "2000"
        files[f"{base}/warn_current_limit_{k}"] = "1500"
    return files


# Jetson Nano (4 GB), JetPack 4: one INA3221 at 6-0040 through iio.
NANO_JP4: Tree = {
    **_ina3221x_iio(
        "bus/i2c/devices/6-0040/iio:device0",
        {0: ("POM_5V_IN", 5000, 800), 1: ("POM_5V_GPU", 5000, 120), 2: ("POM_5V_CPU", 5000, 300)},
    ),
}

# Jetson TX2, JetPack 4: two INA3221 at 0-0040 and 0-0041; VDD_IN is on the second one, and
# one channel's in_power file is missing (computed from voltage × current instead).
_tx2: dict[str, str | Link] = {
    **_ina3221x_iio(
        "bus/i2c/devices/0-0040/iio:device0",
        {
            0: ("VDD_SYS_GPU", 19000, 100),
            1: ("VDD_SYS_SOC", 19000, 50),
            2: ("VDD_4V0_WIFI", 19000, 20),
        },
    ),
    **_ina3221x_iio(
        "bus/i2c/devices/0-0041/iio:device1",
        {0: ("VDD_IN", 19000, 250), 1: ("VDD_SYS_CPU", 19000, 40), 2: ("VDD_SYS_DDR", 19000, 30)},
    ),
}
del _tx2["bus/i2c/devices/0-0041/iio:device1/in_power2_input"]
TX2_JP4: Tree = _tx2

# Jetson AGX Thor: one INA238 on VIN (µW power register) plus an INA3221 for sub-rails.
THOR: Tree = {
    "firmware/devicetree/base/compatible": "nvidia,p3971-0000+p3834-0008\0nvidia,tegra264",
    "bus/i2c/devices/2-0044/name": "ina238",
    "bus/i2c/devices/2-0044/hwmon/hwmon4/name": "ina238",
    "bus/i2c/devices/2-0044/hwmon/hwmon4/in0_input": "12",
    "bus/i2c/devices/2-0044/hwmon/hwmon4/in1_input": "19500",
    "bus/i2c/devices/2-0044/hwmon/hwmon4/curr1_input": "3100",
    "bus/i2c/devices/2-0044/hwmon/hwmon4/power1_input": "60450000",
    "bus/i2c/devices/2-0044/hwmon/hwmon4/temp1_input": "41250",
    "class/hwmon/hwmon4": Link("../../bus/i2c/devices/2-0044/hwmon/hwmon4"),
    **_ina3221_hwmon(
        "bus/i2c/devices/2-0040/hwmon/hwmon5",
        {1: ("VDD_GPU", 5000, 4000), 2: ("VDD_CPU_SOC_MSS", 5000, 2000), 3: ("NC", 0, 0)},
    ),
}

_RAPL_RANGE = "262143328850"

# Intel laptop: RAPL package-0 (core, uncore sub-zones) and psys, an MMIO duplicate of the
# package counter, a battery and a mains adapter (online, no measurement).
INTEL_LAPTOP: Tree = {
    "class/powercap/intel-rapl/enabled": "1",
    "class/powercap/intel-rapl:0/name": "package-0",
    "class/powercap/intel-rapl:0/energy_uj": "262143000000",
    "class/powercap/intel-rapl:0/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl:0:0/name": "core",
    "class/powercap/intel-rapl:0:0/energy_uj": "1000000",
    "class/powercap/intel-rapl:0:0/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl:0:1/name": "uncore",
    "class/powercap/intel-rapl:0:1/energy_uj": "500000",
    "class/powercap/intel-rapl:0:1/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl:1/name": "psys",
    "class/powercap/intel-rapl:1/energy_uj": "7000000",
    "class/powercap/intel-rapl:1/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl-mmio:0/name": "package-0",
    "class/powercap/intel-rapl-mmio:0/energy_uj": "99",
    "class/powercap/intel-rapl-mmio:0/max_energy_range_uj": _RAPL_RANGE,
    "class/power_supply/AC/type": "Mains",
    "class/power_supply/AC/online": "1",
    "class/power_supply/BAT0/type": "Battery",
    "class/power_supply/BAT0/status": "Charging",
    "class/power_supply/BAT0/voltage_now": "12600000",
    "class/power_supply/BAT0/current_now": "1500000",
}

# Two-socket server: ACPI power meter (system input) and RAPL packages with dram sub-zones.
SERVER: Tree = {
    "class/hwmon/hwmon2/name": "power_meter",
    "class/hwmon/hwmon2/power1_average": "285000000",
    "class/hwmon/hwmon2/power1_average_interval": "1000",
    "class/powercap/intel-rapl:0/name": "package-0",
    "class/powercap/intel-rapl:0/energy_uj": "1000000",
    "class/powercap/intel-rapl:0/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl:0:0/name": "dram",
    "class/powercap/intel-rapl:0:0/energy_uj": "1000000",
    "class/powercap/intel-rapl:0:0/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl:1/name": "package-1",
    "class/powercap/intel-rapl:1/energy_uj": "2000000",
    "class/powercap/intel-rapl:1/max_energy_range_uj": _RAPL_RANGE,
    "class/powercap/intel-rapl:1:0/name": "dram",
    "class/powercap/intel-rapl:1:0/energy_uj": "2000000",
    "class/powercap/intel-rapl:1:0/max_energy_range_uj": _RAPL_RANGE,
}

# Raspberry Pi-like board: a USB-C input supply that measures voltage and current, plus the
# firmware's under-voltage hwmon (alarms only, no power) and the CPU thermal hwmon.
RASPBERRY_PI_LIKE: Tree = {
    "class/power_supply/usb/type": "USB",
    "class/power_supply/usb/online": "1",
    "class/power_supply/usb/voltage_now": "5120000",
    "class/power_supply/usb/current_now": "1350000",
    "class/hwmon/hwmon0/name": "cpu_thermal",
    "class/hwmon/hwmon0/temp1_input": "52100",
    "class/hwmon/hwmon1/name": "rpi_volt",
    "class/hwmon/hwmon1/in0_lcrit_alarm": "0",
}

# A hwmon device exposing only energy counters (like amd_energy): differenced into watts.
ENERGY_HWMON: Tree = {
    "class/hwmon/hwmon3/name": "amd_energy",
    "class/hwmon/hwmon3/energy1_label": "Esocket0",
    "class/hwmon/hwmon3/energy1_input": "5000000",
}

EMPTY: Tree = {"class/power_supply/.keep": "", "class/hwmon/.keep": ""}
