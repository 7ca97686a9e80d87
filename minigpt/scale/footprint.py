"""Energy, carbon and water of IT energy: the last step down the scale package.

    energy drawn   = IT energy × PUE                   (IT energy: chips × W × time, host included
                                                        when the watts are a system's)
    tCO2e (gross)  = MWh drawn × kgCO2e/kWh            (the grid's mix)
    tCO2e (net)    = MWh drawn × net kgCO2e/kWh        (after carbon-free energy purchases; only
                                                        when carbon_net_kg_per_kwh is given)
    water on-site  = MWh of IT energy × WUE  (L/kWh)   (the datacentre's cooling: before PUE)
    water off-site = MWh drawn × EWIF (L/kWh)          (the generation's water: after PUE)
    water          = on-site + off-site                (Li et al. 2023, arXiv 2304.03271)

MWh × L/kWh = m³. Per query: Wh × L/kWh = mL. The parameters are minigpt.energy.accounting.Settings,
from constants.toml's sourced defaults or the scenario's [hardware] fields (settings_of).
Footprint (a training run's, in MWh) and QueryFootprint (one query's, in Wh) are the typed results.
"""

from dataclasses import asdict, dataclass

from minigpt import units
from minigpt.energy import accounting
from minigpt.scale.scenario import Scenario

SETTING_KEYS = ("pue", "carbon_kg_per_kwh", "carbon_net_kg_per_kwh", "water_onsite_l_per_kwh",
                "water_offsite_l_per_kwh", "household_kwh_per_year")
# ratios of the energy units, exact in floating point (1e3, 1e6, 1e9): W·h of chip-hours × W
# to MWh, a year's Wh to GWh, MWh to kWh
WH_PER_MWH = units.J_PER_MWH / units.J_PER_WH
WH_PER_GWH = units.J_PER_GWH / units.J_PER_WH
KWH_PER_MWH = units.J_PER_MWH / units.J_PER_KWH


def settings_of(scn: Scenario) -> accounting.Settings:
    """The scenario's PUE, grid, water and household figures over constants.toml's defaults."""
    hw = scn.values["hardware"]
    given = {k: hw.get(k) for k in SETTING_KEYS}
    s = accounting.settings(**given, water_l_per_kwh=hw.get("water_l_per_kwh"))
    for k in (*SETTING_KEYS, "water_l_per_kwh"):
        if k in hw:
            s.origins["water_onsite_l_per_kwh" if k == "water_l_per_kwh" else k] = scn.where(
                "hardware", k)
    return s


def _times(x: float, factor: float | None) -> float | None:
    return None if factor is None else x * factor


def water_terms(it: float, drawn: float, s: accounting.Settings) -> tuple:
    """(on-site, off-site, total) for IT and drawn energy in one unit (MWh -> m³, Wh -> mL)."""
    onsite = _times(it, s.water_onsite_l_per_kwh)
    offsite = _times(drawn, s.water_offsite_l_per_kwh)
    known = [w for w in (onsite, offsite) if w is not None]
    return onsite, offsite, sum(known) if known else None


@dataclass(frozen=True)
class Footprint:
    """A training run's energy (MWh), carbon (tCO2e) and water (m³); None: a factor not given."""

    energy_it_mwh: float  # before PUE
    energy_mwh: float  # drawn: × PUE
    co2_tonnes: float  # gross
    co2_net_tonnes: float | None
    water_onsite_m3: float | None
    water_offsite_m3: float | None
    water_m3: float | None  # the known terms' sum
    households_year: float  # US homes' electricity for a year

    def to_json(self) -> dict:
        return asdict(self)  # the field names are the JSON keys


def footprint(it_mwh: float, s: accounting.Settings) -> Footprint:
    """Energy drawn, gross and net carbon, water on two terms and households, from IT MWh."""
    mwh = it_mwh * s.pue
    onsite, offsite, water = water_terms(it_mwh, mwh, s)
    return Footprint(it_mwh, mwh, mwh * s.carbon_kg_per_kwh, _times(mwh, s.carbon_net_kg_per_kwh),
                     onsite, offsite, water, mwh * KWH_PER_MWH / s.household_kwh_per_year)


@dataclass(frozen=True)
class QueryFootprint:
    """One query's IT Wh, carbon (gCO2e) and water (mL), from the Wh it draws after PUE."""

    wh_it_per_query: float
    co2_g_per_query: float  # gross
    co2_net_g_per_query: float | None
    water_onsite_ml_per_query: float | None
    water_offsite_ml_per_query: float | None
    water_ml_per_query: float | None

    def to_json(self) -> dict:
        return asdict(self)  # the field names are the JSON keys


def per_query(wh: float, s: accounting.Settings) -> QueryFootprint:
    """Grams of CO2e (gross, net) and mL of water of one query of `wh` Wh drawn (after PUE)."""
    it = wh / s.pue
    onsite, offsite, water = water_terms(it, wh, s)
    return QueryFootprint(it, wh * s.carbon_kg_per_kwh, _times(wh, s.carbon_net_kg_per_kwh),
                          onsite, offsite, water)
