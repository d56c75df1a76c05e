//! Market signals over time: tightness and price elasticity.
