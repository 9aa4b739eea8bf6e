//! gopush: a uid-sticky edge proxy for Socket.IO, WebSocket and long-polling clusters.
//!
//! Every request is resolved to a user id ([`uid`]), routed by Ketama consistent hashing of that
//! uid to a healthy backend of its pool ([`routing`], with [`affinity`] for live sessions), and
//! forwarded with the uid the agent resolved ([`forward`]); WebSocket upgrades pass through
//! ([`upgrade`]). [`proxy`] is the one Pingora `ProxyHttp` implementation tying the steps together;
//! [`config`] is the validated YAML model, [`server`] assembles the Pingora server, [`cli`] is the
//! command line and [`demo`] the built-in demo backends. [`hooks`] runs the operator's
//! JavaScript hooks; [`jwt`] and [`callback`] are the signed-token and auth-callback uid sources;
//! [`admin`] is the admin listener (JSON API, push through the Socket.IO Redis adapter, the admin
//! page) and [`metrics`] the one Prometheus registry it serves, bumped where each event happens.
//! See docs/ARCHITECTURE.md.

pub mod access_log;
pub mod acme;
pub mod admin;
pub mod affinity;
pub mod callback;
pub mod cli;
pub mod client_ip;
pub mod cluster;
pub mod config;
pub mod decide;
pub mod demo;
pub mod forward;
pub mod handover;
pub mod hooks;
pub mod jwt;
pub mod kick;
pub mod limits;
pub mod live;
pub mod local_tcp;
pub mod logging;
pub mod metrics;
pub mod presence;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod tls;
pub mod uid;
pub mod upgrade;
pub mod webhooks;
