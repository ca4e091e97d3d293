"""A Raspberry Pi 5 as edged's power discovery sees it: the device tree's ``compatible`` below
a sysfs root, and ``vcgencmd pmic_read_adc`` on the PATH.

``PMIC_READ_ADC`` is in the format the Pi 5 firmware prints: one line per ADC channel, the
channel name right-aligned in 12 columns, currents (channels 0-7, 17, 18, 16, 22) before
voltages (8-15, 20, 21, 19, 23-25) in the firmware's order, values with 8 decimals and the
unit. That layout was taken from public captures of real Pi 5 Model B boards (Raspberry Pi
OS bookworm, firmware from 2024) quoted in open-source Pi 5 power tools and their tests,
found by code search. The values are ours: a Pi 5 under inference load, chosen so the watts
are easy to check by hand (``VDD_CORE``: 3.2 A × 0.875 V = 2.8 W). Only the command is fake
(a script that prints this text); the parser under test is the real one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .sysfs_trees import Tree

PMIC_READ_ADC = """\
 3V7_WL_SW_A current(0)=0.04810000A
   3V3_SYS_A current(1)=0.07200000A
   1V8_SYS_A current(2)=0.15500000A
  DDR_VDD2_A current(3)=0.18000000A
  DDR_VDDQ_A current(4)=0.04400000A
   1V1_SYS_A current(5)=0.19000000A
    0V8_SW_A current(6)=0.35000000A
  VDD_CORE_A current(7)=3.20000000A
   3V3_DAC_A current(17)=0.00006105A
   3V3_ADC_A current(18)=0.00042735A
   0V8_AON_A current(16)=0.00427350A
      HDMI_A current(22)=0.01831500A
 3V7_WL_SW_V volt(8)=3.70000000V
   3V3_SYS_V volt(9)=3.30000000V
   1V8_SYS_V volt(10)=1.80000000V
  DDR_VDD2_V volt(11)=1.10000000V
  DDR_VDDQ_V volt(12)=0.60000000V
   1V1_SYS_V volt(13)=1.10000000V
    0V8_SW_V volt(14)=0.80000000V
  VDD_CORE_V volt(15)=0.87500000V
   3V3_DAC_V volt(20)=3.30000000V
   3V3_ADC_V volt(21)=3.30000000V
   0V8_AON_V volt(19)=0.80000000V
      HDMI_V volt(23)=5.10000000V
     EXT5V_V volt(24)=5.12000000V
      BATT_V volt(25)=0.00000000V
"""

PMIC_RAIL_WATTS = {
    "3V7_WL_SW": 0.0481 * 3.7,
    "3V3_SYS": 0.072 * 3.3,
    "1V8_SYS": 0.155 * 1.8,
    "DDR_VDD2": 0.18 * 1.1,
    "DDR_VDDQ": 0.044 * 0.6,
    "1V1_SYS": 0.19 * 1.1,
    "0V8_SW": 0.35 * 0.8,
    "VDD_CORE": 3.2 * 0.875,
    "3V3_DAC": 0.00006105 * 3.3,
    "3V3_ADC": 0.00042735 * 3.3,
    "0V8_AON": 0.0042735 * 0.8,
    "HDMI": 0.018315 * 5.1,
}
"""Every current-sensed rail; ``EXT5V`` and ``BATT`` have a voltage only."""

PMIC_TOTAL_W = 4.30640702  # the sum of the above, worked out by hand

# /sys of a Pi 5: its device tree names the board and the SoC; no power sensor in sysfs.
PI5: Tree = {
    "firmware/devicetree/base/compatible": "raspberrypi,5-model-b\0brcm,bcm2712",
    "firmware/devicetree/base/model": "Raspberry Pi 5 Model B Rev 1.0\0",
    "class/hwmon/hwmon0/name": "cpu_thermal",
    "class/hwmon/hwmon0/temp1_input": "52150",
    "class/hwmon/hwmon1/name": "rpi_volt",
    "class/hwmon/hwmon1/in0_lcrit_alarm": "0",
}


def fake_vcgencmd(directory: Path, output: str = PMIC_READ_ADC, *, body: str = "") -> Path:
    """Write ``directory/vcgencmd``, which prints ``output`` for ``pmic_read_adc`` (or runs
    ``body``, a shell snippet, instead) and records every call in ``directory/calls``.
    Returns ``directory``, to put first on the PATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pmic_read_adc.txt").write_text(output, encoding="utf-8")
    script = directory / "vcgencmd"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> "{directory}/calls"\n'
        'if [ "$1" != pmic_read_adc ]; then echo "error=2 error_msg=\\"Invalid arguments\\""; '
        "exit 2; fi\n" + (body or f'cat "{directory}/pmic_read_adc.txt"\n'),
        encoding="utf-8",
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def path_with(directory: Path) -> str:
    """``PATH`` with ``directory`` first."""
    return f"{directory}{os.pathsep}{os.environ.get('PATH', '')}"
